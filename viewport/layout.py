"""The cube-face layout shared by the projection, the face files and the teacher (no torch needed)."""

FACE_NAMES: tuple[str, ...] = ("F", "R", "BA", "L", "T", "BO")
"""Cube-face names in output order."""

FACE_CENTERS_DEG: tuple[tuple[float, float], ...] = (
    (0.0, 0.0), (90.0, 0.0), (180.0, 0.0), (-90.0, 0.0), (0.0, 90.0), (0.0, -90.0))
"""(longitude, latitude) in degrees of each cube face's centre, in `FACE_NAMES` order."""
