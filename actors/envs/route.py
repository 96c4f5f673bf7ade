"""A route as a polyline of centre points, and a vehicle's position measured against it.

The CARLA backend's route is a list of map waypoints (or a file of points); this turns a world
position into the `DrivingState` quantities (signed lateral offset, heading error, progress and
look-ahead points), in the right-handed convention of `common.driving`.
"""

from __future__ import annotations

import math

import numpy as np

from common.driving import LOOKAHEAD_POINTS, to_ego_frame, wrap_angle


class Route:
    """Points (N, 2), N >= 2, in a right-handed world frame (x, y with y to the left of x).

    `project` remembers the segment it found last and only searches forward from it (a few
    segments back too, for a vehicle that reversed), so a route that passes near itself is never
    matched to its later part, and a step costs O(1).
    """

    SEARCH_BACK = 2
    SEARCH_AHEAD = 50

    def __init__(self, points: np.ndarray) -> None:
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 2:
            raise ValueError(f"a route needs at least 2 points of (x, y), got shape {pts.shape}")
        seg = np.diff(pts, axis=0)
        lengths = np.hypot(seg[:, 0], seg[:, 1])
        keep = np.concatenate([[True], lengths > 1e-6])  # repeated points would make zero-length segments
        self.points = pts[keep]
        if len(self.points) < 2:
            raise ValueError("a route needs at least 2 distinct points")
        seg = np.diff(self.points, axis=0)
        self._lengths = np.hypot(seg[:, 0], seg[:, 1])
        self._dirs = seg / self._lengths[:, None]
        self._s0 = np.concatenate([[0.0], np.cumsum(self._lengths)])  # arc length at each point
        self.length = float(self._s0[-1])
        self._segment = 0

    def reset(self) -> None:
        self._segment = 0

    def project(self, position: np.ndarray) -> tuple[float, float, float]:
        """(s, lateral, heading): arc length of the closest point, signed distance (positive =
        left of the route), and the route heading there, in radians."""
        p = np.asarray(position, dtype=np.float64)
        lo = max(self._segment - self.SEARCH_BACK, 0)
        hi = min(self._segment + self.SEARCH_AHEAD, len(self._lengths))
        rel = p - self.points[lo:hi]
        along = np.clip(np.einsum("ij,ij->i", rel, self._dirs[lo:hi]), 0.0, self._lengths[lo:hi])
        closest = self.points[lo:hi] + along[:, None] * self._dirs[lo:hi]
        dist = np.hypot(*(p - closest).T)
        k = int(np.argmin(dist))
        self._segment = lo + k
        d = self._dirs[self._segment]
        r = rel[k]
        lateral = float(d[0] * r[1] - d[1] * r[0])  # z of d x r: positive when p is left of d
        return float(self._s0[self._segment] + along[k]), lateral, math.atan2(d[1], d[0])

    def locate(self, points: np.ndarray, near_s: float, window: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(s, lateral, heading) of each of `points` (M, 2), as `project` measures them, against the
        route's segments within `window` metres of arc length `near_s` only (so another pass of the
        route nearby is not matched); leaves `project`'s memory alone."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 1, 2)
        seg = np.flatnonzero((self._s0[1:] >= near_s - window) & (self._s0[:-1] <= near_s + window))
        rel = p - self.points[seg][None]
        along = np.clip(np.einsum("mij,ij->mi", rel, self._dirs[seg]), 0.0, self._lengths[seg])
        gap = rel - along[..., None] * self._dirs[seg][None]
        k = np.argmin(np.hypot(gap[..., 0], gap[..., 1]), axis=1)
        rows = np.arange(len(p))
        d, r = self._dirs[seg[k]], rel[rows, k]
        lateral = d[:, 0] * r[:, 1] - d[:, 1] * r[:, 0]
        return self._s0[seg[k]] + along[rows, k], lateral, np.arctan2(d[:, 1], d[:, 0])

    def point_at(self, s: np.ndarray) -> np.ndarray:
        """Points (M, 2) at arc lengths `s`, extrapolated along the last segment past the end."""
        s = np.asarray(s, dtype=np.float64)
        i = np.clip(np.searchsorted(self._s0, s, side="right") - 1, 0, len(self._lengths) - 1)
        return self.points[i] + (s - self._s0[i])[:, None] * self._dirs[i]

    def measure(self, position: np.ndarray, yaw: float, spacing: float) -> tuple[float, float, float, np.ndarray]:
        """(s, lateral, heading_error, lookahead) for a vehicle at `position` facing `yaw`;
        look-ahead points every `spacing` metres ahead of the projection, in the ego frame."""
        s, lateral, heading = self.project(position)
        ahead = self.point_at(s + spacing * np.arange(1, LOOKAHEAD_POINTS + 1))
        lookahead = to_ego_frame(ahead, position, yaw).astype(np.float32)
        return s, lateral, wrap_angle(yaw - heading), lookahead
