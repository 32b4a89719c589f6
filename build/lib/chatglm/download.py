"""``python -m chatglm.download REPO``: the download command (see :mod:`chatglm.weights.download`)."""
from .weights.download import main

if __name__ == "__main__":
    main()
