"""adaptserve: adapt a classifier to an unlabelled target domain (DANN and friends), export it to ONNX,
serve it with BentoML and score batches with it.

Everything lives under this one name — ``adaptserve.train``, ``adaptserve.export``, ``adaptserve.service``,
``adaptserve.cli`` — so a user's own ``train.py``, ``export.py`` or ``service.py`` beside their work can
never shadow a part of the package. In the repository the three parts sit at the root (``train/``,
``export/``, ``service/``, the project's layout); an installed wheel has them inside this folder
(pyproject.toml's package-dir), and a source checkout or a bento reaches them through ``__path__`` below.
"""

from pathlib import Path as _Path

_here = _Path(__file__).resolve().parent
if not (_here / "service").is_dir() and (_here.parent / "service" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821  the parts are beside this folder, not in it


def main(argv: list[str] | None = None) -> int:
    """The ``adaptserve`` command (:func:`adaptserve.cli.main`), imported only when it runs."""
    from adaptserve.cli import main as cli_main

    return cli_main(argv)
