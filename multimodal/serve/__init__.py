"""`multimodal serve`: a search page and a JSON API over an embedding folder or an index (docs/serve.md).

    engine.py      the model and the searched rows: queries of a batch encoded together, searched together
    batching.py    queries arriving together gathered into one batch for the engine's thread
    thumbnails.py  thumbnails read only from the image files and tar members `embed` recorded
    app.py         the FastAPI application: the routes, the bearer token, errors as one sentence
    page.html      the page: one file, no external assets
"""
