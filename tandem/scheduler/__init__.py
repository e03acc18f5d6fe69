"""The cluster cron: periodic tasks that run on exactly one instance at a time, spread evenly."""
