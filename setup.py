# Packaging logic pyproject.toml cannot express: the top-level presets/ folder ships
# inside the wheel as the `recon.presets` package (DESIGN §3 layout).
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["recon", "recon.*", "portrait3d_cli", "portrait3d_cli.*"]) + ["recon.presets"],
    package_dir={"recon.presets": "presets"},
)
