"""archlab's packages, for setuptools (the rest of the build is in pyproject.toml).

The Hydra config tree lives at the repository's top level, ``conf/`` next to ``archlab/``, ``plugins/``
and ``sweeps/``, and is installed as the package ``archlab.conf``, so ``pkg://archlab.conf`` resolves from
an editable install, from a wheel and from any working directory (``tests/test_wheel.py``). setuptools'
``packages.find`` cannot rename a tree, hence this file."""

from setuptools import find_namespace_packages, setup

CONF = ["archlab.conf", *(f"archlab.conf.{name}" for name in find_namespace_packages("conf"))]

setup(
    packages=[*find_namespace_packages(include=["archlab*", "hydra_plugins*"]), *CONF],
    package_dir={"archlab.conf": "conf"},
)
