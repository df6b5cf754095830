"""/docs without a network: Swagger UI's assets come from the `swagger-ui-bundle-v2` package and are
served by the app itself (FastAPI's own /docs page loads them from a CDN, blank when offline)."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/static/swagger"


def mount_offline_docs(app: FastAPI) -> None:
    """GET /docs: Swagger UI over /openapi.json, every asset served from ASSETS (create the app with docs_url=None)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        swagger_ui_path = None

    if swagger_ui_path is not None:
        app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="swagger-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        if swagger_ui_path is None:
            return HTMLResponse("<p>Swagger UI assets are not installed (pip install swagger-ui-bundle-v2); "
                                f"the schema is at <a href='{app.openapi_url}'>{app.openapi_url}</a>.</p>", 503)
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - docs",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no badge from swagger.io
