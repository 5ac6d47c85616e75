"""Stage 4, fit: Gaussian splats in gsplat's parameterisation fitted to a ViewSet.

splat.fit_splats (the stage), render.render_scene (renders a Scene for export and the
`render` command), rasterize.rasterization (our CPU rasterizer, gsplat's call),
backend.select_rasterizer (gsplat on CUDA, ours elsewhere). Imports stay lazy so
`import recon.fit` does not load gsplat.
"""
