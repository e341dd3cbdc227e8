"""PET data: phantoms, tracer kinetics, paired-task simulation, file loaders and the Grain pipeline."""
