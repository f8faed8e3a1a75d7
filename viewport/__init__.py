"""ERP -> rectilinear viewports in torch.

`viewport.project` holds the projection (`cube_faces`, `extract`, ...); `viewport.extract` is the
command that writes a database's cube faces. The package re-exports the projection's helpers but
not `project.extract`, whose name the command module takes.
"""
from .project import (
    FACE_CENTERS_DEG,
    FACE_NAMES,
    clear_cache,
    cube_faces,
    native_face_size,
    native_size,
)

__all__ = ["FACE_CENTERS_DEG", "FACE_NAMES", "clear_cache", "cube_faces", "native_face_size", "native_size"]
