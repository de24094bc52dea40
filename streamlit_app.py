"""Gyroscope's entrypoint.

`streamlit run streamlit_app.py` imports this module as an ASGI app (`app` below: the
dashboard plus the HTTP API routes); each browser session then runs it as a script, where
it is only the router between the pages.
"""

import streamlit as st

if __name__ == "__main__":  # a browser session running the script
    st.set_page_config(page_title="Gyroscope", page_icon=":material/explore:", layout="wide")
    nav = st.navigation([
        st.Page("pages/generate.py", title="Generate", icon=":material/edit_note:", default=True),
        st.Page("pages/metrics.py", title="Metrics", icon=":material/monitoring:", url_path="metrics"),
        st.Page("pages/settings.py", title="Settings", icon=":material/tune:", url_path="settings"),
    ])
    nav.run()
else:  # imported by `streamlit run` (uvicorn) as the ASGI application
    from starlette.middleware import Middleware

    from core.api import lifespan, routes
    from core.http import guard
    from core.http.assets import StaticAssets
    from core.http.shell import PageShell
    # The providers import the `openai` package (0.45 s of this 2-core VM), which otherwise
    # happens when the first page visit builds the service: the app's very first visit paid
    # it. Imported here, the server start pays it instead (nothing is built or connected).
    from core.providers import openai_provider, simulator_provider  # noqa: F401

    try:
        # Until some session has run st.navigation, Streamlit treats a `pages/` folder as a
        # v1 multipage app, so a first visit straight to /metrics would run that page file
        # alone (no navigation, no layout). This app always navigates with st.navigation.
        from streamlit.runtime.pages_manager import PagesManager

        PagesManager.uses_pages_directory = False
    except ImportError:  # a later Streamlit without the v1 fallback
        pass

    # The guard wraps everything, the dashboard's websocket included: Streamlit's own
    # server.allowedHosts and XSRF checks do not cover st.App routes (see core/http/guard.py).
    api = routes()
    # Innermost: a page's HTML is Streamlit's index.html plus where the server's root is, so a
    # page opened by its URL does not guess it wrong first (core/http/shell.py).
    # It also holds a Ctrl+Enter typed in Generate's prompt box ("prompt") before the Generate
    # button ("go") is drawn, from before any element loads (pages/generate.py).
    shell = Middleware(PageShell, base_path=st.get_option("server.baseUrlPath"), reserved=("api", "v1"),
                       shortcuts=(("go", "prompt"),))
    # Innermost too: Streamlit's front-end files (~100 per cold visit) from memory, not through
    # StaticFiles' stat/open/thread hops in the sessions' event loop (core/http/assets.py).
    assets = Middleware(StaticAssets, base_path=st.get_option("server.baseUrlPath"))
    app = st.App(__file__, routes=api, lifespan=lifespan, middleware=[*guard.middleware(routes=api), shell, assets])
