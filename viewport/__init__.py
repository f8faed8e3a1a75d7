"""The paper's MATLAB viewport folder in torch: its own cube faces (`viewport.equi2cubic`, its equi2cubic.m,
used by `--protocol paper`), our batched projection in py360convert's geometry (`viewport.project`, the
default faces and any viewport), and the cube-face layout (`viewport.layout`). `python img_resize.py
--faces` writes a database's cube faces with them."""
