"""Package layout (the metadata is in pyproject.toml).

`configs/` and `assets/` stay top-level folders of the repository and ship inside the package as `sail_jax.configs`
and `sail_jax.assets` (sail_jax/resources.py finds them either way). pyproject.toml alone cannot declare them: its
package discovery only finds folders that are already inside a package, and a fixed list would miss new modules.
"""

from setuptools import find_namespace_packages, find_packages, setup

DATA = {"sail_jax.configs": "configs", "sail_jax.assets": "assets"}


def data_packages(package: str, folder: str) -> list[str]:
    """`package` and one package per sub-folder of `folder` (each ships all of its files)."""
    return [package, *(f"{package}.{sub}" for sub in find_namespace_packages(where=folder))]


packages = find_packages(include=["sail_jax*", "pallas_kernels*", "converters*"])
data = [name for package, folder in DATA.items() for name in data_packages(package, folder)]
setup(packages=packages + data, package_dir=dict(DATA), package_data={name: ["*"] for name in data})
