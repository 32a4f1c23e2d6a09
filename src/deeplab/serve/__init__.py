"""``deeplab serve``: segmentation as an HTTP API and a web page (extra ``[serve]``).

:func:`deeplab.serve.app.create_app` turns a :class:`deeplab.segmenter.Segmenter` into a
FastAPI application: ``POST /v1/segment``, ``GET /v1/model``, ``GET /healthz``, the OpenAPI
docs at ``/docs`` and the page at ``/`` (its files in ``static/``, served by us, no CDN).
Import :mod:`deeplab.serve.app` only where FastAPI is installed (``pip install 'deeplab[serve]'``).
"""
