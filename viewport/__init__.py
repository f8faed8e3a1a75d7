"""ERP -> rectilinear viewports in torch (`viewport.project`), the cube-face layout
(`viewport.layout`), and the command that writes a database's cube faces (`python -m viewport.extract`)."""
