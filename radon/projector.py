"""Forward projection (Radon transform) and its exact adjoint, in pure `jax.numpy`.

Kernel design
-------------
The projector is Joseph's method computed by a shear. Each angle is handled along the image axis the
ray crosses most steeply: rows when `|cos theta| >= |sin theta|`, columns otherwise (the image is
transposed so one kernel serves both). Along that axis the ray through bin `k` meets line `r` at the
fractional in-line index `u = alpha*k + beta*r + gamma`, with per-angle constants. Writing
`beta*r = n_r + f_r` (integer plus fraction) splits the ray sum in two cheap, dense steps:

1. *Shear and sum.* Each line is read at an integer offset `n_r` as one contiguous slice (a gather
   of whole rows, never of single pixels) and the lines are summed with the two linear-interpolation
   weights `(1 - f_r, f_r)`, giving the ray sums `Q[m]` on the sheared grid, whose spacing along the
   detector is `pixel * |cos theta|` (finer than a pixel).
2. *Resample to bins.* `Q` is linearly interpolated at the bin positions `alpha*k + gamma` and scaled
   by the ray length per line, `pixel / |cos theta|`: each bin reads its two cells as one contiguous
   `(2, batch)` slice.

The batch is moved to the last axis, and each slice is read as one flat run of `cells x batch` floats.
`forward` runs a `lax.scan` over the lines, several per step (below): each line is zero-padded (a small
buffer, materialised) and one fused elementwise loop reads them at every angle's offset, weights the
slices and adds them into all angles' sheared grids `(angles, cells, batch)`. `adjoint` is the loop
transposed: a scan over the angles, each step turning that angle's sinogram row into its sheared grid
and reading it back into every line of the image. Working set: `forward` the sheared grids plus the lines
(4.1x image + sinogram at 256x256, 256 angles), `adjoint` the image accumulator plus one step's buffers
(1.5-1.8x); there is no system matrix. All index arithmetic (`n_r`, `f_r`, bin positions, the adjoint's
tap and bin tables) is done once per geometry in float64 numpy and enters the program as constant tables.

What XLA:CPU makes fast here, measured (128x128, 180 angles, 128 bins):
- A gather whose operand is a small materialised buffer, fused into the elementwise loop that consumes
  it, stays a cheap slice read. The same gather from a slice of a larger array (a scanned-over `xs` or a
  dynamic slice) fuses into a per-element dynamic-slice and ran ~7x slower; hence the pads inside the
  scan steps.
- Slices read as flat runs, so the fused loop's innermost dimension is `cells x batch` long. With
  `(cells, batch)` slices it is only `batch` long, and at some batches (12 and 16 for forward, 4 to 16 for
  an adjoint variant) LLVM unrolled it and vectorised the strided outer loop instead: 3-7x slower.
- Steps sized to XLA's threading: a fused loop over ~60k elements per line (angle) is split across
  threads, which it then waits for every step; see `_SPLIT_FROM`.

`forward` used to map over angles: per angle it materialised a `(lines, cells + 1, batch)` gather (6 MB at
batch 32), streamed it through a `(2, lines)` matrix product (the weights), then built a dense
`(bins, cells)` interpolation matrix for a second product. At batch 32 the skinny product took most of
the time (65-80%; the gather ~20%); at batch 1 the dense bin matrix took ~70%. The scan over lines, two
per step, was 5x (batch 32) and 7x (batch 1) faster, with half the compiled memory and the same result up
to float32 rounding (the sum over lines runs in another order: 9e-7 of the maximum). Flat slices and 8
lines per step once the loop is threaded then gave another 1.25-1.35x at batch 32 and 6x at batch 12
and 16 (unchanged within noise at batch 1; bit-identical).

The adjoint then still scanned over the angles building, per angle, the dense `(bins, cells)`
interpolation matrix and multiplying by its transpose, and then read twice as many supersampled line
samples as there are pixels into a `(lines, 2 x pixels, batch)` accumulator. It took 1.1-1.2x forward's
time at batch 32 and 2.7-3.1x at batch 1 (forward/adjoint 0.82-0.88 and 0.32-0.37). Now each step:
1. bins -> sheared grid, the transpose of the bin interpolation as a gather: a per-geometry table lists the
   bins that read each cell (one when bins are at least a sheared cell apart), and each cell gathers their
   ray-scaled `(batch,)` rows from the angle's sinogram row, fused into step 2's buffer. (A scatter-add
   of all angles before the scan, the plain transpose of the bin gather, worked too, but its zeroed
   `(angles, cells, batch)` buffer, copies and update array cost about a fifth of the time at batch 32.)
2. sheared grid -> lines, supersampling folded in: a pixel's two samples read three consecutive cells
   with weights `(f, 1, 1 - f)`. The grid is padded and split by phase into `P[phase, i, b] = q[2b + phase
   + i]`, so each of the three taps of a whole line is one contiguous run of `pixels x batch` floats.
Same process, machine loaded, three runs (each the median of 5): the adjoint is 5.1-5.7x faster at
batch 1, 2.3-3.6x at batch 8 and 1.9-2.1x at batch 32; forward/adjoint is now 1.9-2.2 at batch 1 and
1.3-1.4 at batch 32.
Results match the old adjoint to 4e-7 of the maximum (float32 rounding) on square, rectangular, odd-sized
and coarse/fine-bin geometries. Its main loop is now an ideal vector loop (6 tap loads, the accumulator's
load and store per 8 outputs, 2 angles per step) bound by the accumulator's memory traffic; 3 or 4
angles per step were no faster.

Both functions are ordinary JAX code, so `grad`, `jvp`, `vmap` and `linear_transpose` work on them; the
adjoint is the exact transpose of `forward` up to float32 rounding (tested with a dot test), and the
autodiff transpose of `forward` is mathematically `adjoint`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from radon.geometry import Geometry
from radon.validation import check_array

# Samples per pixel along each line. Each line is read as the piecewise-constant image it is, at
# half-pixel spacing, which halves the width of both linear interpolations (along the line, and from
# the sheared grid to the bins): rays are then sharper than Joseph's method, at twice its cost.
_SUPERSAMPLE = 2

# Lines (forward) or angles (adjoint) handled per scan step, in one fused loop, small or big step.
# XLA:CPU splits a fused loop across threads once its cost model puts it over ~100 us of work per thread,
# and then waits for the threads every step. One line's (angle's) loop crosses that at ~60k elements
# (measured: forward 57k no, 64k yes; adjoint 50k no, 66k yes). Below, a step runs on one thread and the
# small step is fastest: a bigger one gets split and waits (adjoint, 1 vs 2 angles: ~1.8x at batch 1 and
# 2; forward, 2 vs 8 lines: 1.4x at batch 1). Above, the loop is split anyway and the big step amortises the
# waits and the passes over the accumulator: forward 8 vs 2 lines 1.2-1.4x at batch 2 to 32 (4 lines:
# 1.0-1.25x), adjoint 2 vs 1 angles ~1.25x at batch 4 to 32 (3 or 4: no better). 128x128, 180 angles,
# machine loaded.
_SPLIT_FROM = 60_000
_LINES_PER_STEP = (2, 8)
_ANGLES_PER_STEP = (1, 2)


def _per_step(elements, small_big):
    """Lines or angles per scan step when each adds `elements` to the fused loop."""
    return small_big[elements >= _SPLIT_FROM]


@dataclasses.dataclass(frozen=True)
class _AngleSet:
    """Constant tables for the angles handled along one image axis."""

    index: np.ndarray  # (n,) positions of these angles in the geometry's angle order
    start: np.ndarray  # (n, R) int32 slice start of each line in the zero-padded line array
    frac: np.ndarray  # (n, R) float32 interpolation fraction f_r of each line
    bin_cell: np.ndarray  # (n, B) int32 sheared-grid cell left of each bin
    bin_frac: np.ndarray  # (n, B) float32 position of each bin inside that cell
    ray_mm: np.ndarray  # (n,) float32 ray length per line in mm
    cell_bin: np.ndarray  # (n, M, J) int32 adjoint: the bins whose interpolation reads each cell (B: none)
    cell_weight: np.ndarray  # (n, M, J) float32 adjoint: their weights (1 - bin_frac or bin_frac; 0: none)
    tap_phase: np.ndarray  # (n, R) int32 adjoint: phase of the sheared-grid cell under each line's first tap
    tap_block: np.ndarray  # (n, R) int32 adjoint: block (of _SUPERSAMPLE cells) of that first tap
    tap_pad: int  # adjoint: zero cells before a sheared grid so every first tap is at a cell >= 0
    tap_blocks: int  # adjoint: blocks per phase array, so every tap is in range
    lines: int  # R: number of lines (rows, or columns for the transposed case)
    length: int  # L: samples per line (pixels x _SUPERSAMPLE)


@dataclasses.dataclass(frozen=True)
class _Plan:
    rows: _AngleSet
    cols: _AngleSet
    cells: int  # M: sheared-grid samples per angle
    pad: int  # zeros on each side of a line so every slice is in range


@functools.lru_cache(maxsize=64)
def _plan(geom: Geometry) -> _Plan:
    H, W = geom.image_shape
    B, p, b = geom.n_bins, geom.pixel_size, geom.bin_spacing
    theta = geom.theta
    c, s = np.cos(theta), np.sin(theta)
    along_rows = np.abs(c) >= np.abs(s)
    k = np.arange(B)

    q = p / _SUPERSAMPLE  # sample spacing along a line, mm

    def coefficients(idx, transposed):
        cc, ss = c[idx], s[idx]
        if not transposed:  # line r = image row i at y_i; u indexes the samples along the row
            alpha = b / (q * cc)
            beta = p * ss / (q * cc)
            gamma = -(B - 1) / 2 * alpha - (H - 1) / 2 * beta + (_SUPERSAMPLE * W - 1) / 2
            ray = p / np.abs(cc)
        else:  # line r = image column j at x_j; u indexes the samples down the column
            alpha = -b / (q * ss)
            beta = p * cc / (q * ss)
            gamma = (_SUPERSAMPLE * H - 1) / 2 + (B - 1) / 2 * b / (q * ss) - (W - 1) / 2 * beta
            ray = p / np.abs(ss)
        return alpha, beta, gamma, ray

    row_idx, col_idx = np.nonzero(along_rows)[0], np.nonzero(~along_rows)[0]
    coeffs = [coefficients(row_idx, False), coefficients(col_idx, True)]
    alphas = np.concatenate([coeffs[0][0], coeffs[1][0]])
    cells = int(np.ceil(np.max(np.abs(alphas)) * (B - 1))) + 2 if alphas.size else 2
    pad = cells + 1

    def angle_set(idx, coef, lines, length):
        alpha, beta, gamma, ray = coef
        bins = alpha[:, None] * k[None, :] + gamma[:, None]  # (n, B) sheared position of each bin
        m0 = np.floor(bins.min(axis=1))
        shift = beta[:, None] * np.arange(lines)[None, :]
        n_r = np.floor(shift)
        rel = bins - m0[:, None]
        cell = np.floor(rel)
        start = (m0[:, None] + n_r + pad).astype(np.int64)
        # Adjoint: `forward` reads sample u of a line into cells u + pad - start (weight 1 - f) and one below
        # (weight f), so pixel j's _SUPERSAMPLE samples read cells first + S*j ... first + S*j + S, with
        # first = pad - start - 1, weights (f, 1, ..., 1, 1 - f). Shifted by tap_pad to be >= 0 and split into
        # phase (first mod S) and block (first // S).
        first = pad - start - 1
        tap_pad = max(0, -int(first.min())) if first.size else 0
        first = first + tap_pad
        pixels = length // _SUPERSAMPLE
        last_block = int(first.max()) // _SUPERSAMPLE if first.size else 0
        tap_blocks = max(last_block + pixels, -(-(tap_pad + cells) // _SUPERSAMPLE))
        bin_cell, bin_frac = cell.astype(np.int32), (rel - cell).astype(np.float32)
        cell_bin, cell_weight = _cell_bins(bin_cell, bin_frac, cells)
        return _AngleSet(
            index=idx,
            start=start.astype(np.int32),
            frac=(shift - n_r).astype(np.float32),
            bin_cell=bin_cell,
            bin_frac=bin_frac,
            ray_mm=ray.astype(np.float32),
            cell_bin=cell_bin,
            cell_weight=cell_weight,
            tap_phase=(first % _SUPERSAMPLE).astype(np.int32),
            tap_block=(first // _SUPERSAMPLE).astype(np.int32),
            tap_pad=tap_pad,
            tap_blocks=tap_blocks,
            lines=lines,
            length=length,
        )

    return _Plan(
        rows=angle_set(row_idx, coeffs[0], H, _SUPERSAMPLE * W),
        cols=angle_set(col_idx, coeffs[1], W, _SUPERSAMPLE * H),
        cells=cells,
        pad=pad,
    )


def _cell_bins(bin_cell, bin_frac, cells):
    """Transpose of the bin interpolation as tables: for each angle and cell, the bins that read the cell.

    Bin k reads cell `bin_cell[k]` with weight `1 - bin_frac[k]` and the next cell with weight `bin_frac[k]`
    (the float32 values `forward` uses). Returns `(n, M, J)` bin indices, in increasing bin order, and
    weights, `J` the most bins reading one cell (2 when bins are at least a sheared cell apart); unused
    entries point at bin `B` (a zero row) with weight 0.
    """
    n, B = bin_cell.shape
    angle = np.repeat(np.arange(n), 2 * B)
    cell = np.concatenate([bin_cell, bin_cell + 1], axis=1).ravel().astype(np.int64)
    k = np.tile(np.concatenate([np.arange(B), np.arange(B)]), n)
    weight = np.concatenate([np.float32(1) - bin_frac, bin_frac], axis=1).ravel()
    order = np.lexsort((k, cell, angle))
    angle, cell, k, weight = angle[order], cell[order], k[order], weight[order]
    new_group = np.ones(angle.size, bool)
    new_group[1:] = (angle[1:] != angle[:-1]) | (cell[1:] != cell[:-1])
    rank = np.arange(angle.size) - np.maximum.accumulate(np.where(new_group, np.arange(angle.size), 0))
    J = int(rank.max()) + 1 if rank.size else 1
    cell_bin = np.full((n, cells, J), B, np.int32)
    cell_weight = np.zeros((n, cells, J), np.float32)
    cell_bin[angle, cell, rank] = k
    cell_weight[angle, cell, rank] = weight
    return cell_bin, cell_weight


def _tables(aset: _AngleSet):
    return {
        "start": jnp.asarray(aset.start),
        "frac": jnp.asarray(aset.frac),
        "bin_cell": jnp.asarray(aset.bin_cell),
        "bin_frac": jnp.asarray(aset.bin_frac),
        "ray_mm": jnp.asarray(aset.ray_mm),
        "cell_bin": jnp.asarray(aset.cell_bin),
        "cell_weight": jnp.asarray(aset.cell_weight),
        "tap_phase": jnp.asarray(aset.tap_phase),
        "tap_block": jnp.asarray(aset.tap_block),
    }


_ROW_SLICES = lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0, 1))


def _line_slices(padded, start, size):
    """Row `r` of the result is `padded[start[r] : start[r] + size]` flattened: `(R, size * N)` from `(L, N)`.

    The operand is one flat row and each slice one contiguous run of `size * N` floats, so the fused loop
    that reads it iterates (and LLVM vectorises) that run whatever the batch `N`. With `(size, N)` slices
    the inner loop is only `N` long, and at some batches LLVM unrolled it and vectorised across the
    strided outer loop instead (batch 12 and 16: ~5-7x slower). A rank-1 operand (no row index)
    measured ~10x slower still.
    """
    N = padded.shape[-1]
    idx = jnp.stack([jnp.zeros_like(start), start * N], axis=-1)
    return lax.gather(padded.reshape(1, -1), idx, _ROW_SLICES, (1, size * N), mode=lax.GatherScatterMode.CLIP)


_BIN_CELLS = lax.GatherDimensionNumbers(offset_dims=(2, 3), collapsed_slice_dims=(0,), start_index_map=(0, 1))
_TAPS = lax.GatherDimensionNumbers(offset_dims=(1, 2), collapsed_slice_dims=(0,), start_index_map=(0, 2))


def _forward_set(lines, aset: _AngleSet, plan: _Plan):
    """Sinogram rows `(n, B, N)` of one angle set from the lines `(R, pixels, N)`."""
    lines = jnp.repeat(lines, _SUPERSAMPLE, axis=1)  # the same piecewise-constant image, finer samples
    t = _tables(aset)
    n, M, N = len(aset.index), plan.cells, lines.shape[-1]
    start, frac = t["start"].T, t["frac"].T  # (R, n): each line's slice start and fraction at each angle
    per_step = _per_step(n * M * N, _LINES_PER_STEP)
    extra = -lines.shape[0] % per_step  # zero lines (adding exact zeros) to fill the last step
    if extra:
        lines = jnp.pad(lines, ((0, extra), (0, 0), (0, 0)))
        start = jnp.pad(start, ((0, extra), (0, 0)), constant_values=plan.pad)
        frac = jnp.pad(frac, ((0, extra), (0, 0)))
    steps = lines.shape[0] // per_step

    def body(q, xs):
        for line, line_start, line_frac in zip(*xs):  # one fused loop adds per_step lines to q
            # Padded here, inside the step, so the gather reads a small materialised buffer: gathering
            # from a slice of the whole padded line array fuses into a per-element dynamic-slice (~7x slower).
            padded = jnp.pad(line, ((plan.pad, plan.pad), (0, 0)))
            g = _line_slices(padded, line_start, M + 1)  # (n, (M+1) N): cells m and m + 1 are N floats apart
            f = line_frac[:, None]
            q = q + (1.0 - f) * g[:, : M * N] + f * g[:, N:]
        return q, None

    xs = tuple(a.reshape((steps, per_step) + a.shape[1:]) for a in (lines, start, frac))
    q, _ = lax.scan(body, jnp.zeros((n, M * N), jnp.float32), xs)
    q = q.reshape(n, M, N)  # all angles' sheared grids
    # Resample to bins: bin k reads cells (bin_cell, bin_cell + 1) of its angle, one contiguous (2, N) slice.
    angle = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], t["bin_cell"].shape)
    idx = jnp.stack([angle, t["bin_cell"]], axis=-1)
    pair = lax.gather(q, idx, _BIN_CELLS, (1, 2, N), mode=lax.GatherScatterMode.CLIP)  # (n, B, 2, N)
    w = t["bin_frac"][..., None]
    return t["ray_mm"][:, None, None] * ((1.0 - w) * pair[:, :, 0] + w * pair[:, :, 1])


def _backproject_angle(row, ray, cell_bin, cell_weight, phase, block, frac, aset: _AngleSet):
    """Transpose of one angle's `forward`: sinogram row `(B, N)` -> `(R, pixels * N)` on the lines.

    1. Bins -> sheared grid `q` `(M, N)`, the transpose of the bin interpolation: each cell gathers the
       (at most J) bins that read it, as contiguous `(N,)` rows of the ray-scaled sinogram row.
    2. Sheared grid -> lines. Pixel j of line r reads cells first + S*j + i, i = 0..S, with weights
       (f, 1, ..., 1, 1 - f); `first` is `S * block + phase` after `tap_pad` zero cells. Tap i of every
       pixel is then one contiguous run of `pixels * N` floats in phase array `phase`, row i:
       `P[phase, i, b] = q_padded[S*b + phase + i]`.
    """
    S, N = _SUPERSAMPLE, row.shape[-1]
    M, J = cell_bin.shape
    pixels, blocks = aset.length // S, aset.tap_blocks
    s = jnp.pad(ray * row, ((0, 1), (0, 0)))  # (B + 1, N): bin B is the zero row unused entries point at
    q = sum(cell_weight[:, j, None] * s[cell_bin[:, j]] for j in range(J))  # (M, N)
    # Padded and split inside the scan step: the gather below then reads a small materialised buffer.
    qp = jnp.pad(q, ((aset.tap_pad, S * (blocks + 1) - M - aset.tap_pad), (0, 0)))
    phases = jnp.stack([jnp.stack([qp[r + i :: S][:blocks] for i in range(S + 1)]) for r in range(S)])
    phases = phases.reshape(S, S + 1, blocks * N)  # (pixel, batch) flattened: each tap is one run
    idx = jnp.stack([phase, block * N], axis=-1)
    g = lax.gather(phases, idx, _TAPS, (1, S + 1, pixels * N), mode=lax.GatherScatterMode.CLIP)  # (R, S+1, .)
    f = frac[:, None]
    return f * g[:, 0] + sum(g[:, i] for i in range(1, S)) + (1.0 - f) * g[:, S]


def _adjoint_set(sino_rows, aset: _AngleSet, plan: _Plan):
    """Back-projection `(R, pixels, N)` of the sinogram rows `(n, B, N)` of one angle set."""
    t = _tables(aset)
    n, _, N = sino_rows.shape
    R, pixels = aset.lines, aset.length // _SUPERSAMPLE
    xs = [sino_rows] + [t[k] for k in ("ray_mm", "cell_bin", "cell_weight", "tap_phase", "tap_block", "frac")]
    per_step = _per_step(R * pixels * N, _ANGLES_PER_STEP)
    extra = -n % per_step  # zero rows (adding exact zeros) to fill the last step
    if extra:
        xs = [jnp.pad(a, ((0, extra),) + ((0, 0),) * (a.ndim - 1)) for a in xs]
    steps = xs[0].shape[0] // per_step

    def body(acc, xs):
        for angle_xs in zip(*xs):  # one fused loop adds per_step angles to the lines
            acc = acc + _backproject_angle(*angle_xs, aset)
        return acc, None

    xs = tuple(a.reshape((steps, per_step) + a.shape[1:]) for a in xs)
    acc, _ = lax.scan(body, jnp.zeros((R, pixels * N), jnp.float32), xs)
    return acc.reshape(R, pixels, N)


@functools.partial(jax.jit, static_argnums=1)
def _forward(image, geom: Geometry):
    plan = _plan(geom)
    lead = image.shape[:-2]
    x = image.reshape((-1,) + geom.image_shape).astype(jnp.float32)
    x = jnp.moveaxis(x, 0, -1)  # (H, W, N): batch last, so slices are contiguous
    parts, order = [], []
    if len(plan.rows.index):
        parts.append(_forward_set(x, plan.rows, plan))
        order.append(plan.rows.index)
    if len(plan.cols.index):
        parts.append(_forward_set(jnp.swapaxes(x, 0, 1), plan.cols, plan))
        order.append(plan.cols.index)
    sino = jnp.concatenate(parts, axis=0)[np.argsort(np.concatenate(order))]  # (A, B, N)
    sino = jnp.moveaxis(sino, -1, 0).reshape(lead + geom.sino_shape)
    return sino.astype(_result_dtype(image.dtype))


@functools.partial(jax.jit, static_argnums=1)
def _adjoint(sino, geom: Geometry):
    plan = _plan(geom)
    lead = sino.shape[:-2]
    y = sino.reshape((-1,) + geom.sino_shape).astype(jnp.float32)  # (N, A, B)
    image = jnp.zeros(geom.image_shape + (y.shape[0],), jnp.float32)
    # Each set's rows are picked, then moved to batch last (n, B, N), in one copy.
    if len(plan.rows.index):
        image = image + _adjoint_set(jnp.moveaxis(y[:, plan.rows.index], 0, -1), plan.rows, plan)
    if len(plan.cols.index):
        cols = _adjoint_set(jnp.moveaxis(y[:, plan.cols.index], 0, -1), plan.cols, plan)
        image = image + jnp.swapaxes(cols, 0, 1)
    image = jnp.moveaxis(image, -1, 0).reshape(lead + geom.image_shape)
    return image.astype(_result_dtype(sino.dtype))


def _result_dtype(dtype):
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def forward(image, geom: Geometry):
    """Line integrals of `image` `(..., H, W)` (activity per pixel) -> sinogram `(..., n_angles, n_bins)`.

    Units: activity x mm. Computed in float32; bfloat16/float16 inputs give outputs of the same dtype.
    """
    check_array(image, geom.image_shape, "image", "(..., H, W)")
    return _forward(image, geom)


def adjoint(sino, geom: Geometry):
    """Exact adjoint (back-projection) of `forward`: sinogram `(..., n_angles, n_bins)` -> `(..., H, W)`."""
    check_array(sino, geom.sino_shape, "sinogram", "(..., n_angles, n_bins)")
    return _adjoint(sino, geom)
