"""enserve: an inference server for ensembles of deep neural networks, and the pipeline that builds
them. The packages, in layers: ``cli`` over ``tuning`` and ``loadtest``, over ``models``, over
``server``, over ``optimizer``, over the shared ``combiners`` (docs/architecture.md)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("enserve")  # one home: pyproject.toml
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
