"""The tasks ALL-PET learns: their names, which are paired, and which training stage serves each.

A task's id (the prompt's third entry, `Prompt.task`) is its index in `TASKS`; the U-Net's task table
has one more row, `len(TASKS)`, the null task of classifier-free guidance. `synthesis` generates a
sinogram from a prompt alone and is what the foundation model learns; every other task maps a source
sinogram to a target sinogram and is learnt by the `task` stage, starting from the foundation.

What the simulator does for each task (tracers, doses, frames) lives in `data/simulate.py`; the
training stages themselves in `training/stages.py`. This module only names things.
"""

from __future__ import annotations

SYNTHESIS = "synthesis"
"""The unpaired task: a sinogram from a prompt (tracer, region, geometry)."""
LOW_DOSE = "low_dose"
"""The paired task whose source is a low-dose acquisition: the one Poisson guidance measures."""

TASKS = (SYNTHESIS, LOW_DOSE, "attenuation_correction", "delayed_frame", "tracer_conversion", "tracer_separation")
"""Task names; a task's id is its index here."""
PAIRED_TASKS = tuple(t for t in TASKS if t != SYNTHESIS)
"""The tasks with a source and a target sinogram."""
NULL_TASK = len(TASKS)
"""The task id of "no task": the null row of the U-Net's task table (classifier-free guidance)."""

STAGE_OF_TASK = {SYNTHESIS: "foundation"} | {t: "task" for t in PAIRED_TASKS}
"""The training stage (and stage directory under a run's workdir) whose model serves each task."""


def task_id(task: str) -> int:
    """The id of `task` (its index in `TASKS`); a clear error for an unknown name."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    return TASKS.index(task)


def is_paired(task: str) -> bool:
    """Whether `task` maps a source sinogram to a target (every task but `synthesis`)."""
    return task_id(task) != TASKS.index(SYNTHESIS)
