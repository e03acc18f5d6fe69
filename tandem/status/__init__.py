"""The built-in status page at ``/``: the cluster cron at a glance, for those without Grafana.
Server-rendered HTML with no external assets (it works offline), refreshed live."""
