"""Method plugins of amisbench, installed as ``amisbench.methods``: one module or subpackage per method."""

if __name__ == "methods":
    raise ImportError("the folder 'methods' of amisbench must be imported as amisbench.methods; "
                      "install the project (pip install -e .) instead of adding its root to sys.path")
