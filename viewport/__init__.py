"""ERP -> rectilinear viewports in torch (see `viewport.project`)."""
from .project import (
    FACE_CENTERS_DEG,
    FACE_NAMES,
    clear_cache,
    cube_faces,
    extract,
    native_face_size,
    native_size,
)

__all__ = [
    "FACE_CENTERS_DEG",
    "FACE_NAMES",
    "clear_cache",
    "cube_faces",
    "extract",
    "native_face_size",
    "native_size",
]
