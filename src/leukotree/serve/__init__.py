"""The lab's web app (``leukotree serve``): cases in SQLite, classification in the
background, pages and a JSON API on FastAPI (``pip install 'leukotree[serve]'``)."""
