"""The change stream: events written with the changes they report, stamped into one order by
the sequencer, read by ``GET /events`` and delivered to webhook endpoints."""
