"""The 2D parallel-beam geometry shared by every operator in `radon`.

Conventions (DESIGN.md 2.1): image `(..., H, W)`, pixel `[i, j]` at
`x = (j - (W-1)/2) * pixel_size`, `y = ((H-1)/2 - i) * pixel_size` (row 0 is the top, y points up);
sinogram `(..., n_angles, n_bins)`, bin `k` at `s_k = (k - (n_bins-1)/2) * bin_spacing`; the ray for
`(theta, s)` is the line `x cos(theta) + y sin(theta) = s`. Sizes are in mm, angles in radians.

`Geometry` is a frozen, hashable dataclass so it can be a static argument of `jax.jit`. It holds no
arrays: explicit angles are stored as a tuple of floats.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Parallel-beam geometry: image grid, detector bins and projection angles.

    Args:
      image_shape: `(H, W)` pixels.
      n_angles: number of projection angles.
      n_bins: number of detector bins.
      pixel_size: pixel side in mm.
      bin_spacing: detector bin spacing in mm.
      angles: optional explicit angles in radians (length `n_angles`); default `k * pi / n_angles`.
    """

    image_shape: tuple[int, int]
    n_angles: int
    n_bins: int
    pixel_size: float = 1.0
    bin_spacing: float = 1.0
    angles: tuple[float, ...] | None = None

    def __post_init__(self):
        shape = tuple(self.image_shape) if np.ndim(self.image_shape) == 1 else None
        if shape is None or len(shape) != 2 or not all(_is_positive_int(n) for n in shape):
            raise ValueError(f"Geometry.image_shape must be two positive integers (H, W); got {self.image_shape!r}")
        object.__setattr__(self, "image_shape", (int(shape[0]), int(shape[1])))
        for name in ("n_angles", "n_bins"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(f"Geometry.{name} must be a positive integer; got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("pixel_size", "bin_spacing"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"Geometry.{name} must be a finite positive size in mm; got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.angles is not None:
            angles = np.asarray(self.angles, dtype=np.float64)
            if angles.shape != (self.n_angles,):
                raise ValueError(
                    f"Geometry.angles must have shape (n_angles,) = ({self.n_angles},); got shape {angles.shape}"
                )
            if not np.all(np.isfinite(angles)):
                raise ValueError("Geometry.angles must be finite radians; got NaN or inf")
            object.__setattr__(self, "angles", tuple(float(a) for a in angles))

    @property
    def theta(self) -> np.ndarray:
        """Projection angles in radians, `(n_angles,)` float64."""
        if self.angles is not None:
            return np.asarray(self.angles, dtype=np.float64)
        return np.arange(self.n_angles, dtype=np.float64) * np.pi / self.n_angles

    @property
    def sino_shape(self) -> tuple[int, int]:
        """`(n_angles, n_bins)`."""
        return (self.n_angles, self.n_bins)

    @property
    def x_mm(self) -> np.ndarray:
        """x of each image column in mm, `(W,)`."""
        W = self.image_shape[1]
        return (np.arange(W) - (W - 1) / 2) * self.pixel_size

    @property
    def y_mm(self) -> np.ndarray:
        """y of each image row in mm, `(H,)` (row 0 is the top, so y decreases)."""
        H = self.image_shape[0]
        return ((H - 1) / 2 - np.arange(H)) * self.pixel_size

    @property
    def s_mm(self) -> np.ndarray:
        """Signed distance of each detector bin from the centre in mm, `(n_bins,)`."""
        return (np.arange(self.n_bins) - (self.n_bins - 1) / 2) * self.bin_spacing

    @property
    def fov_radius_mm(self) -> float:
        """Radius of the largest disc centred in the image that every ray set covers."""
        H, W = self.image_shape
        return 0.5 * min(min(H, W) * self.pixel_size, self.n_bins * self.bin_spacing)

    def to_dict(self) -> dict:
        """The fields as JSON types (lists, numbers, None): what shard manifests and checkpoints record."""
        return {
            "image_shape": list(self.image_shape),
            "n_angles": self.n_angles,
            "n_bins": self.n_bins,
            "pixel_size": self.pixel_size,
            "bin_spacing": self.bin_spacing,
            "angles": None if self.angles is None else list(self.angles),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        """The geometry `to_dict` recorded (`angles` may be absent)."""
        angles = d.get("angles")
        return cls(image_shape=tuple(d["image_shape"]), n_angles=d["n_angles"], n_bins=d["n_bins"],
                   pixel_size=d["pixel_size"], bin_spacing=d["bin_spacing"],
                   angles=None if angles is None else tuple(angles))

    @classmethod
    def square(cls, n: int, n_angles: int | None = None, **kwargs) -> "Geometry":
        """An `n x n` image with `n` bins of one pixel each and `n_angles` (default `n`) angles."""
        return cls(image_shape=(n, n), n_angles=n_angles or n, n_bins=n, **kwargs)


def _is_positive_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0
