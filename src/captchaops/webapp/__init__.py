"""The demo web app: one page and a JSON API over the model servers and the tracking server."""
