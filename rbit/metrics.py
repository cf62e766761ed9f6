"""The worker's counters, and the optional HTTP endpoint serving ``/healthz``, ``/metrics`` and the live page."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import web

log = logging.getLogger(__name__)

#: Job-duration buckets, in seconds: builds take seconds to hours.
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200)


class Metrics:
    """Prometheus counters of one worker, in a registry of its own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.jobs = Counter("rbit_jobs", "Jobs ended, by queue and final status.",
                            ["queue", "status"], registry=self.registry)
        self.duration = Histogram("rbit_job_duration_seconds", "How long jobs ran, by queue.",
                                  ["queue"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.rejected = Counter("rbit_rejected_messages", "Messages moved to the rejected queue, by source queue.",
                                ["queue"], registry=self.registry)
        self.reconnects = Counter("rbit_reconnects", "Reconnections to the broker after a lost connection.",
                                  registry=self.registry)
        self.running = Gauge("rbit_jobs_running", "Jobs running now.", registry=self.registry)
        self.backlog = Gauge("rbit_status_backlog", "Status reports waiting to reach PyBit.",
                             registry=self.registry)

    def job_ended(self, queue, status, seconds):
        self.jobs.labels(queue=queue, status=status).inc()
        self.duration.labels(queue=queue).observe(seconds)

    def exposition(self):
        return generate_latest(self.registry)


class HealthServer:
    """Serves ``/healthz`` (200 when connected and serving, else 503), ``/metrics``, and with a
    :class:`rbit.web.Board` the live page (:mod:`rbit.web`). Read-only: GET alone is answered."""

    def __init__(self, address, metrics, health, board=None):
        self.address = address
        self.metrics = metrics
        self.health = health
        self.board = board
        self.server = None

    def start(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, owner.metrics.exposition())
                elif self.path == "/healthz":
                    state = owner.health()
                    body = json.dumps(state).encode()
                    self._send(200 if state["healthy"] else 503, "application/json", body)
                elif owner.board is None or not web.handle(self, owner.board, owner.health):
                    self._send(404, "text/plain", b"not found: try /, /jobs, /healthz or /metrics\n")

            def _send(self, code, content_type, body):
                web.send(self, code, content_type, body)

            def log_message(self, format, *args):
                log.debug("http: " + format, *args)

        self.server = ThreadingHTTPServer(self.address, Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="rbit-http", daemon=True).start()
        log.info("serving %s/healthz and /metrics on http://%s:%d", "the live page, /jobs, " if self.board else "",
                 *self.server.server_address[:2])

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
