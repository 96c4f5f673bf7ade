"""A top-down camera for highway-env that draws on plain pygame surfaces.

highway-env's own `EnvViewer` redraws every lane stripe of the whole track each frame (80% of
the env step time) and silently returns black frames when SDL_VIDEODRIVER=dummy. This camera
draws the road once onto a large surface, then per frame blits the window around the ego
vehicle and draws the vehicles on top. It never opens a pygame display, so no video driver is
involved and frames are real pictures on any machine.
"""

from __future__ import annotations

import math

import numpy as np
import pygame
from highway_env.road.graphics import RoadGraphics, WorldSurface
from highway_env.road.road import Road
from highway_env.vehicle.graphics import VehicleGraphics

GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)
OTHER_SHADE, EGO_SHADE = 0, 200
"""Gray levels of the `contrast` camera's vehicles, against road 100 and lane markings 255."""
_MARGIN_M = 60.0


def _road_bounds(road: Road) -> tuple[np.ndarray, np.ndarray]:
    points = []
    for _from, tos in road.network.graph.items():
        for lanes in tos.values():
            for lane in lanes:
                for s in np.linspace(0.0, lane.length, 32):
                    points.append(lane.position(s, 0.0))
    pts = np.asarray(points)
    return pts.min(axis=0) - _MARGIN_M, pts.max(axis=0) + _MARGIN_M


class TopDownCamera:
    """Renders `size` x `size` pixel views centred on a vehicle at `scaling` px/m: north up, or
    with `heading_up` turned so the ego's heading points up, as a camera mounted on the car sees."""

    def __init__(self, road: Road, size: int, scaling: float, vehicles: str = "highway", heading_up: bool = False) -> None:
        lo, hi = _road_bounds(road)
        big = tuple(int(np.ceil(v)) for v in (hi - lo) * scaling)
        self._road_surface = WorldSurface(big, 0, pygame.Surface(big))
        self._road_surface.scaling = scaling
        self._road_surface.origin = lo
        RoadGraphics.display(road, self._road_surface)
        # A turned view is cut from the middle of a window whose inscribed circle covers its corners.
        window = int(math.ceil(size * math.sqrt(2))) + 2 if heading_up else size
        self._view = WorldSurface((window, window), 0, pygame.Surface((window, window)))
        self._view.scaling = scaling
        self._view.centering_position = [0.5, 0.5]
        self.vehicles = vehicles
        self.size = size
        self.heading_up = heading_up

    def rgb(self, road: Road, centre: np.ndarray, ego: object | None = None) -> np.ndarray:
        """(size, size, 3) uint8 view of the road and every vehicle around `centre`.

        `vehicles="highway"` draws them as highway-env does (thin outlines whose fill is close to
        the road's gray); "contrast" fills each footprint with one flat shade, the other vehicles
        black and `ego` light gray, so traffic stands out after the gray conversion."""
        view = self._view
        view.move_display_window_to(centre)
        view.fill(view.GREY)
        dx, dy = (self._road_surface.origin - view.origin) * view.scaling
        view.blit(self._road_surface, (int(round(dx)), int(round(dy))))
        for vehicle in road.vehicles:
            if not view.is_visible(vehicle.position):
                continue
            if self.vehicles == "contrast":
                shade = EGO_SHADE if vehicle is ego else OTHER_SHADE
                pygame.draw.polygon(view, (shade,) * 3, [view.vec2pix(p) for p in vehicle.polygon()[:4]])
            else:
                VehicleGraphics.display(vehicle, view, offscreen=True)
        surface = self._turn(view, ego) if self.heading_up else view
        # surfarray is (x, y, c); images are (row=y, col=x).
        return np.ascontiguousarray(pygame.surfarray.array3d(surface).transpose(1, 0, 2))

    def _turn(self, view: pygame.Surface, ego: object | None) -> pygame.Surface:
        """The middle `size` x `size` of `view` turned so that `ego`'s heading points up. The
        screen's y axis points down, so a heading h (radians from +x toward +y) is a clockwise
        angle on screen; pygame turns counter-clockwise by degrees."""
        if ego is None:
            raise ValueError("a heading-up camera needs the ego vehicle to turn its view")
        turned = pygame.transform.rotate(view, 90.0 + math.degrees(ego.heading))
        w, h = turned.get_size()
        return turned.subsurface(((w - self.size) // 2, (h - self.size) // 2, self.size, self.size))

    def gray(self, road: Road, centre: np.ndarray, ego: object | None = None) -> np.ndarray:
        """(size, size) uint8 grayscale view."""
        rgb = self.rgb(road, centre, ego).astype(np.float32)
        return np.clip(rgb @ GRAY_WEIGHTS, 0, 255).astype(np.uint8)
