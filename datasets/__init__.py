"""Dataset adapters of amisbench, installed as ``amisbench.datasets`` (never as a top-level ``datasets``)."""

if __name__ == "datasets":  # the folder was put on sys.path by mistake: it would shadow Hugging Face's
    raise ImportError("the folder 'datasets' of amisbench must be imported as amisbench.datasets; "
                      "install the project (pip install -e .) instead of adding its root to sys.path")
