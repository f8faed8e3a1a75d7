"""ERP -> rectilinear viewports in torch (`viewport.project`) and the cube-face layout (`viewport.layout`):
the paper's MATLAB viewport folder. `python img_resize.py --faces` writes a database's cube faces with it."""
