"""portrait3d command line: a thin Typer + Rich shell over the `recon` engine."""
