"""The local stack: services under supervisord, the artifact store, the tracking server, webhooks."""
