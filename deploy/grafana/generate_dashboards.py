#!/usr/bin/env python3
"""Generates the Grafana dashboards in deploy/grafana/dashboards/.

The JSON files are committed; edit this script and rerun it
(`python3 deploy/grafana/generate_dashboards.py`) rather than editing the JSON
by hand. Every metric used must be in deploy/METRICS.md
(`cargo test -p cardpipe-tests --test promtool_rules` checks).

Store gauges (applications per state, queue depths, outbox, overdue, near
voiding, stock, CRL) are the same in every cardpipe process: the queries use
the recording rules or `max`, never `sum`, across replicas.
"""

import json
import pathlib

OUT = pathlib.Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


class Layout:
    """Places panels left to right on Grafana's 24-column grid."""

    def __init__(self):
        self.panels = []
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1

    def _place(self, panel, w, h):
        if self.x + w > 24:
            self.x = 0
            self.y += self.row_h
            self.row_h = 0
        panel["id"] = self.next_id
        self.next_id += 1
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        self.panels.append(panel)

    def row(self, title):
        if self.x:
            self.y += self.row_h
        self.x = 0
        self.row_h = 0
        self._place(
            {"type": "row", "title": title, "collapsed": False, "panels": []}, 24, 1
        )
        self.x = 0
        self.y += 1
        self.row_h = 0

    def add(self, panel, w=12, h=8):
        self._place(panel, w, h)


def target(expr, legend="", ref="A", instant=False, table=False):
    t = {
        "datasource": DS,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "refId": ref,
        "range": not instant,
        "instant": instant,
    }
    if table:
        t["format"] = "table"
    return t


def targets(queries):
    refs = "ABCDEFGHIJ"
    return [target(q[0], q[1] if len(q) > 1 else "", refs[i]) for i, q in enumerate(queries)]


def thresholds(steps):
    return {
        "mode": "absolute",
        "steps": [{"color": c, "value": v} for v, c in steps],
    }


GREEN = [(None, "green")]


def timeseries(title, queries, unit="short", desc="", stack=False, fill=10, minimum=None,
               maximum=None, steps=None, bars=False):
    defaults = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "custom": {
            "drawStyle": "bars" if bars else "line",
            "lineWidth": 1,
            "fillOpacity": 60 if bars else (40 if stack else fill),
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "axisSoftMin": 0,
            "thresholdsStyle": {"mode": "line" if steps else "off"},
        },
        "thresholds": thresholds(steps or GREEN),
    }
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    return {
        "type": "timeseries",
        "title": title,
        "description": desc,
        "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets(queries),
    }


def stat(title, expr, unit="short", desc="", steps=None, decimals=None, graph=True):
    defaults = {
        "unit": unit,
        "color": {"mode": "thresholds"},
        "thresholds": thresholds(steps or GREEN),
        "mappings": [],
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat",
        "title": title,
        "description": desc,
        "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area" if graph else "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
            "wideLayout": True,
            "showPercentChange": False,
        },
        "targets": [target(expr, "", "A")],
    }


def bargauge(title, expr, legend, unit="short", desc="", steps=None, minimum=0, maximum=None):
    defaults = {
        "unit": unit,
        "min": minimum,
        "color": {"mode": "thresholds"},
        "thresholds": thresholds(steps or GREEN),
    }
    if maximum is not None:
        defaults["max"] = maximum
    return {
        "type": "bargauge",
        "title": title,
        "description": desc,
        "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal",
            "displayMode": "gradient",
            "showUnfilled": True,
            "valueMode": "color",
            "namePlacement": "auto",
            "sizing": "auto",
            "minVizHeight": 10,
            "minVizWidth": 0,
            "maxVizHeight": 300,
        },
        "targets": [target(expr, legend, "A", instant=True)],
    }


def table(title, expr, value_name, desc="", steps=None, unit="short", hide=()):
    exclude = {"Time": True}
    for h in hide:
        exclude[h] = True
    return {
        "type": "table",
        "title": title,
        "description": desc,
        "datasource": DS,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "color": {"mode": "thresholds"},
                "thresholds": thresholds(steps or GREEN),
                "custom": {"align": "auto", "cellOptions": {"type": "color-text"}},
            },
            "overrides": [],
        },
        "options": {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}},
        "transformations": [
            {
                "id": "organize",
                "options": {"excludeByName": exclude, "renameByName": {"Value": value_name}},
            }
        ],
        "targets": [target(expr, "", "A", instant=True, table=True)],
    }


def datasource_var():
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
    }


def query_var(name, label, metric, label_name):
    q = f"label_values({metric}, {label_name})"
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": q,
        "query": {"query": q, "refId": f"{name}-values", "qryType": 1},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": 0,
        "options": [],
        "regex": "",
        "sort": 1,
    }


def dashboard(uid, title, desc, layout, variables=(), refresh="30s", time_from="now-6h"):
    return {
        "id": None,
        "uid": uid,
        "title": title,
        "description": desc,
        "tags": ["cardpipe"],
        "timezone": "utc",
        "editable": False,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": refresh,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": time_from, "to": "now"},
        "timepicker": {},
        "weekStart": "",
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [
            {
                "type": "dashboards",
                "tags": ["cardpipe"],
                "asDropdown": False,
                "includeVars": False,
                "keepTime": True,
                "targetBlank": False,
                "title": "cardpipe",
                "icon": "external link",
                "tooltip": "",
                "url": "",
            }
        ],
        "templating": {"list": [datasource_var(), *variables]},
        "panels": layout.panels,
    }


# ------------------------------------------------------------------ pipeline

IN_FLIGHT_STATES = (
    "received|dedup_pending|dedup_clear|possible_duplicate|cleared|keys_issued|"
    "personalized|qc_passed|qc_failed|reprint_requested|packed|shipped"
)
S = 'stage=~"$stage"'


def pipeline():
    l = Layout()
    l.row("Overview")
    l.add(stat("Applications in production",
               f'sum(cardpipe:applications:max{{state=~"{IN_FLIGHT_STATES}"}})',
               desc="Applications received and not yet at an office (not rejected, duplicate, cancelled, collected or voided)."), 4, 4)
    l.add(stat("At offices", 'sum(cardpipe:applications:max{state="at_office"})',
               desc="Cards waiting at pickup offices."), 4, 4)
    l.add(stat("Jobs done / s", 'sum(stage_outcome:cardpipe_jobs:rate5m{outcome="done"})',
               unit="ops", desc="Jobs completed per second, all stages (5 min rate)."), 4, 4)
    l.add(stat("Parked jobs", 'sum(cardpipe:queue_depth:max{queue="parked"}) or vector(0)',
               desc="Jobs that failed every retry, waiting for an operator (console: Parked work).",
               steps=[(None, "green"), (1, "orange")]), 4, 4)
    l.add(stat("Outbox lag", "cardpipe:outbox_oldest_age_seconds:max", unit="s",
               desc="Age of the oldest undelivered outbox row. Alert over 5 minutes.",
               steps=[(None, "green"), (60, "orange"), (300, "red")]), 4, 4)
    l.add(stat("Overdue (> 30 days)",
               "max(cardpipe_applications_overdue) or vector(0)",
               desc="Applications older than 30 days whose card is not yet at an office (the programme promises 15 days to one month).",
               steps=[(None, "green"), (1, "red")]), 4, 4)

    l.row("Applications")
    l.add(timeseries("Applications per state (in production)",
                     [(f'cardpipe:applications:max{{state=~"{IN_FLIGHT_STATES}"}}', "{{state}}")],
                     stack=True,
                     desc="Applications in each non-final state, from the database (the same value in every process: de-duplicated by a recording rule)."), 16, 9)
    l.add(bargauge("Applications per state (now)", "cardpipe:applications:max", "{{state}}",
                   desc="Every state, including the final ones."), 8, 9)
    l.add(timeseries("Intake records",
                     [(f"sum by (outcome) (rate(cardpipe_intake_records_total[{RATE}]))", "{{outcome}}")],
                     unit="ops", desc="Registry batch records accepted and rejected per second."), 12, 7)
    l.add(timeseries("Batches released",
                     [("sum(increase(cardpipe_batches_released_total[1h]))", "batches / h")],
                     bars=True, desc="Scheduled nightly batches released into the pipeline, per hour."), 12, 7)

    l.row("Stages")
    l.add(timeseries("Throughput per stage",
                     [(f'sum by (stage) (rate(cardpipe_jobs_total{{outcome="done", {S}}}[{RATE}]))', "{{stage}}")],
                     unit="ops", desc="Jobs completed per second, by stage, across replicas."), 12, 8)
    l.add(timeseries("Retried, parked and skipped jobs",
                     [(f'sum by (stage, outcome) (rate(cardpipe_jobs_total{{outcome!="done", {S}}}[{RATE}]))', "{{stage}} {{outcome}}")],
                     unit="ops", desc="Failures sent to retry, jobs parked for good, and duplicate/late deliveries skipped."), 12, 8)
    for q in ("0.50", "0.95", "0.99"):
        l.add(timeseries(f"Job duration p{int(float(q) * 100)}",
                         [(f"histogram_quantile({q}, sum by (stage, le) (rate(cardpipe_job_duration_seconds_bucket{{{S}}}[{RATE}])))", "{{stage}}")],
                         unit="s", desc=f"{q} quantile of the time from delivery to acknowledgement, from the job duration histogram (buckets 1 ms to 30 s)."), 8, 8)
    l.add(timeseries("Mean job duration",
                     [(f"sum by (stage) (rate(cardpipe_job_duration_seconds_sum{{{S}}}[{RATE}])) / sum by (stage) (rate(cardpipe_job_duration_seconds_count{{{S}}}[{RATE}]))", "{{stage}}")],
                     unit="s"), 12, 8)
    l.add(timeseries("Jobs in flight",
                     [(f"sum by (stage) (cardpipe_jobs_in_flight{{{S}}})", "{{stage}}")],
                     desc="Jobs being handled now, across replicas (bounded by concurrency x replicas)."), 12, 8)

    l.row("Queues")
    l.add(timeseries("Ready",
                     [(f'cardpipe:queue_depth:max{{queue="ready", {S}}}', "{{stage}}")],
                     desc="Messages waiting in each stage's work queue. Alert: growing for 30 min above 1000."), 8, 8)
    l.add(timeseries("Retrying",
                     [(f'cardpipe:queue_depth:max{{queue="retrying", {S}}}', "{{stage}}")],
                     desc="Messages in the retry wait queues (failed, waiting for their next attempt)."), 8, 8)
    l.add(timeseries("Parked",
                     [(f'cardpipe:queue_depth:max{{queue="parked", {S}}}', "{{stage}}")],
                     desc="Jobs parked for an operator. Alert: any for 10 min.",
                     steps=[(None, "green"), (1, "red")]), 8, 8)
    l.add(table("Parked work by stage", 'cardpipe:queue_depth:max{queue="parked"} > 0', "Parked",
                desc="Stages with parked work: inspect, retry or drop in the console (Parked work) or with `cardpipe ops parked list`.",
                hide=("__name__", "queue"), steps=[(None, "green"), (1, "red")]), 8, 7)
    l.add(timeseries("RabbitMQ: ready and unacknowledged",
                     [("sum by (queue) (rabbitmq_queue_messages_ready{queue=~\"cardpipe.*\"})", "{{queue}} ready"),
                      ("sum by (queue) (rabbitmq_queue_messages_unacked{queue=~\"cardpipe.*\"})", "{{queue}} unacked")],
                     desc="The broker's own view of cardpipe's queues (rabbitmq_prometheus, per-object metrics)."), 10, 7)
    l.add(timeseries("RabbitMQ: connections and consumers",
                     [("sum(rabbitmq_connections)", "connections"), ("sum(rabbitmq_consumers)", "consumers")]), 6, 7)

    l.row("Outbox")
    l.add(timeseries("Outbox lag",
                     [("cardpipe:outbox_oldest_age_seconds:max", "oldest undelivered row")],
                     unit="s", steps=[(None, "green"), (300, "red")],
                     desc="Age of the oldest outbox row not yet published. Alert over 5 minutes."), 8, 8)
    l.add(timeseries("Outbox pending", [("cardpipe:outbox_pending:max", "rows")],
                     desc="Outbox rows not yet delivered to the broker."), 8, 8)
    l.add(timeseries("Outbox deliveries",
                     [(f"sum by (topic) (rate(cardpipe_outbox_published_total[{RATE}]))", "{{topic}} published"),
                      (f"sum by (topic) (rate(cardpipe_outbox_delivery_failures_total[{RATE}]))", "{{topic}} failed")],
                     unit="ops"), 8, 8)
    l.add(timeseries("Dead letters",
                     [("max(cardpipe_outbox_dead_letters)", "waiting for a supervisor"),
                      (f"sum by (topic) (increase(cardpipe_outbox_dead_lettered_total[{RATE}]))", "{{topic}} given up")],
                     steps=[(None, "green"), (1, "red")],
                     desc="Deliveries the relay gave up on (refused as malformed, or past relay_max_attempts): "
                          "`cardpipe ops dead-letters`, the console's Parked work page."), 12, 7)
    l.add(timeseries("Outbox claims lost",
                     [(f"sum by (topic) (rate(cardpipe_outbox_claims_lost_total[{RATE}]))", "{{topic}}")],
                     unit="ops",
                     desc="Deliveries whose claim had passed to another relay before they were recorded "
                          "(fenced: recorded by the holder only). Persistent non-zero: claims too short."), 12, 7)

    l.row("Hostile input and keys")
    l.add(timeseries("Intake submissions refused",
                     [(f"sum by (reason) (increase(cardpipe_intake_submissions_refused_total[{RATE}]))", "{{reason}}")],
                     desc="Registry batches refused at a bound of [registry.intake] (413/429)."), 8, 7)
    l.add(timeseries("Console sign-ins",
                     [(f"sum by (reason) (rate(cardpipe_console_login_failures_total[{RATE}]))", "refused: {{reason}}"),
                      (f"sum(rate(cardpipe_console_password_checks_total[{RATE}]))", "password checks")],
                     unit="ops",
                     desc="Refused sign-ins by reason and password checks run: a flood shows refusals, "
                          "not checks (the limits are reserved before the password is checked)."), 8, 7)
    l.add(stat("Lookup digests not yet re-keyed", "max(cardpipe_lookup_digests_stale)",
               steps=[(None, "green"), (1, "orange")],
               desc="National-code digests still under an old lookup key after a rotation; "
                    "remove the old key only at 0."), 8, 7)
    l.add(timeseries("Audit checkpoints",
                     [(f"sum by (outcome) (increase(cardpipe_audit_checkpoints_total[{RATE}]))", "{{outcome}}")],
                     desc="Signed audit checkpoint passes. 'refused': the audit chain no longer extends the "
                          "newest checkpoint (tampering; alert CardpipeAuditCheckpointRefused)."), 12, 7)
    l.add(stat("Audit entry vouched for", "max(cardpipe_audit_checkpoint_seq)",
               desc="The audit entry the newest signed checkpoint vouches for; it should follow the "
                    "audit log within runtime.audit_checkpoint_seconds."), 12, 7)

    l.row("Keys and CRL")
    l.add(stat("Time since last CRL", "time() - max(cardpipe_crl_last_published_timestamp_seconds)",
               unit="s", graph=False, desc="Time since the last CRL publication."), 6, 5)
    l.add(stat("CRL nextUpdate in", "max(cardpipe_crl_next_update_timestamp_seconds) - time()",
               unit="s", graph=False, steps=[(None, "red"), (0, "orange"), (3600, "green")],
               desc="Time until the published CRL's nextUpdate. Negative: the CRL is stale (alert)."), 6, 5)
    l.add(timeseries("Keys stage throughput",
                     [(f'sum(rate(cardpipe_jobs_total{{stage="keys", outcome="done"}}[{RATE}]))', "keys issued / s")],
                     unit="ops"), 12, 5)

    l.row("Processes")
    l.add(timeseries("Targets up, by service",
                     [('sum by (service) (up{job=~"cardpipe|rabbitmq"})', "{{service}}")],
                     desc="Replicas Prometheus scrapes successfully, per compose service."), 12, 7)
    l.add(table("Processes not ready", 'probe_success{job="cardpipe-readyz"} == 0', "Ready",
                desc="Replicas whose /readyz fails (broker, store or object store unreachable).",
                hide=("__name__", "job")), 12, 7)

    return dashboard("cardpipe-pipeline", "cardpipe / Pipeline",
                     "Applications per state, stage throughput and latency, queues, outbox, CRL, processes.",
                     l, [query_var("stage", "Stage", "cardpipe_jobs_total", "stage")])


# ------------------------------------------------------------------ encoders

E = 'encoder=~"$encoder"'


def encoders():
    l = Layout()
    l.row("Fleet")
    l.add(stat("Encoders in service", "max(cardpipe_encoders_in_service)",
               steps=[(None, "red"), (1, "green")], desc="Encoders in service (not taken out by an operator, reader present)."), 6, 4)
    l.add(stat("Yield (1 h)", "1 - cardpipe:encoder_spoiled:ratio1h", unit="percentunit", decimals=1,
               steps=[(None, "red"), (0.95, "green")], desc="Share of cards personalized without being spoiled, all encoders, last hour. Alert under 95 %."), 6, 4)
    l.add(stat("Cards / hour", 'sum(rate(cardpipe_encoder_cards_total{outcome="personalized"}[1h])) * 3600',
               desc="Cards personalized in the last hour."), 6, 4)
    l.add(stat("Spoiled (1 h)", 'sum(encoder:cardpipe_encoder_cards:increase1h{outcome="spoiled"}) or vector(0)',
               steps=[(None, "green"), (1, "orange")], decimals=0), 6, 4)

    l.row("Per encoder")
    l.add(timeseries("Yield per encoder (1 h)",
                     [(f"1 - encoder:cardpipe_encoder_spoiled:ratio1h{{{E}}}", "{{encoder}}")],
                     unit="percentunit", minimum=0.8, maximum=1, steps=[(None, "red"), (0.95, "green")],
                     desc="Share of good cards per encoder over the last hour. An encoder under 95 % with at least 20 cards alerts."), 12, 8)
    l.add(bargauge("Spoiled share per encoder (1 h)", f"encoder:cardpipe_encoder_spoiled:ratio1h{{{E}}}", "{{encoder}}",
                   unit="percentunit", maximum=0.2, steps=[(None, "green"), (0.02, "orange"), (0.05, "red")]), 12, 8)
    l.add(timeseries("Throughput per encoder",
                     [(f'sum by (encoder) (rate(cardpipe_encoder_cards_total{{outcome="personalized", {E}}}[{RATE}])) * 3600', "{{encoder}}")],
                     unit="short", desc="Cards personalized per hour, per encoder."), 12, 8)
    l.add(timeseries("Spoiled cards per encoder",
                     [(f'sum by (encoder) (increase(cardpipe_encoder_cards_total{{outcome="spoiled", {E}}}[{RATE}]))', "{{encoder}}")],
                     bars=True), 12, 8)
    l.add(timeseries("Utilisation per encoder",
                     [(f"sum by (encoder) (rate(cardpipe_encoder_busy_seconds_total{{{E}}}[{RATE}]))", "{{encoder}}")],
                     unit="percentunit", minimum=0, maximum=1,
                     desc="Share of time each encoder spent personalizing."), 12, 8)
    l.add(timeseries("Encoders in service", [("max(cardpipe_encoders_in_service)", "in service")]), 12, 8)

    l.row("Personalization stage and quality control")
    l.add(timeseries("Personalize job duration",
                     [(f'histogram_quantile(0.5, sum by (le) (rate(cardpipe_job_duration_seconds_bucket{{stage="personalize"}}[{RATE}])))', "p50"),
                      (f'histogram_quantile(0.95, sum by (le) (rate(cardpipe_job_duration_seconds_bucket{{stage="personalize"}}[{RATE}])))', "p95")],
                     unit="s"), 8, 8)
    l.add(timeseries("QC results",
                     [(f"sum by (outcome) (rate(cardpipe_qc_cards_total[{RATE}]))", "{{outcome}}")],
                     unit="ops", stack=True), 8, 8)
    l.add(bargauge("QC failures by reason (24 h)",
                   'topk(10, sum by (reason) (increase(cardpipe_qc_cards_total{outcome!="passed"}[24h])))', "{{reason}}",
                   steps=[(None, "orange")]), 8, 8)

    l.row("Blank-card stock")
    l.add(table("Stock reconciliation difference by lot",
                "max without (instance, job, service) (cardpipe_stock_reconciliation_difference)", "Difference",
                desc="Cards the books expect minus cards accounted for, per lot. Anything but 0 is an imbalance (alert).",
                steps=[(None, "red"), (0, "green"), (1, "red")], hide=("__name__",)), 12, 7)
    l.add(timeseries("Blank cards by stock state",
                     [("max by (state) (cardpipe_stock_cards)", "{{state}}")],
                     desc="Every serial is in exactly one state (in vault, at encoder, consumed, spoiled, awaiting destruction, destroyed, returned)."), 12, 7)
    l.add(timeseries("QC inspection time",
                     [(f"histogram_quantile(0.5, sum by (le) (rate(cardpipe_qc_inspection_seconds_bucket[{RATE}])))", "p50"),
                      (f"histogram_quantile(0.95, sum by (le) (rate(cardpipe_qc_inspection_seconds_bucket[{RATE}])))", "p95")],
                     unit="s", desc="Read-back, EF.SOD and chains, both challenge-responses, per card."), 24, 7)

    return dashboard("cardpipe-encoders", "cardpipe / Encoders",
                     "Card encoders: yield, throughput, utilisation, in service; QC results; blank-card stock.",
                     l, [query_var("encoder", "Encoder", "cardpipe_encoder_cards_total", "encoder")])


# --------------------------------------------------------------------- dedup

def dedup():
    l = Layout()
    l.row("Overview")
    l.add(stat("Gallery subjects", "sum(max by (shard) (cardpipe_dedup_gallery_subjects))",
               desc="Enrolled subjects across gallery shards."), 6, 4)
    l.add(stat("Search p95", f"histogram_quantile(0.95, sum by (le) (rate(cardpipe_dedup_search_duration_seconds_bucket[{RATE}])))",
               unit="s"), 6, 4)
    l.add(stat("Awaiting adjudication", 'sum(cardpipe:applications:max{state="possible_duplicate"})',
               desc="Possible duplicates waiting for an operator's decision (console: Dedup).",
               steps=[(None, "green"), (50, "orange")]), 6, 4)
    l.add(stat("Possible duplicates (24 h)", "sum(increase(cardpipe_dedup_possible_duplicates_total[24h]))",
               decimals=0), 6, 4)

    l.row("Search")
    l.add(timeseries("Search latency",
                     [(f"histogram_quantile({q}, sum by (le) (rate(cardpipe_dedup_search_duration_seconds_bucket[{RATE}])))", f"p{int(float(q) * 100)}")
                      for q in ("0.5", "0.95", "0.99")],
                     unit="s", desc="1:N search time against the gallery, from the search duration histogram."), 12, 8)
    l.add(timeseries("Searches per second",
                     [(f"sum(rate(cardpipe_dedup_search_duration_seconds_count[{RATE}]))", "searches / s")],
                     unit="ops"), 12, 8)
    l.add(timeseries("Gallery subjects per shard",
                     [("max by (shard) (cardpipe_dedup_gallery_subjects)", "shard {{shard}}")],
                     stack=True), 12, 8)
    l.add(timeseries("Expanded-template cache per shard",
                     [("max by (shard) (cardpipe_dedup_expanded_cache_bytes)", "shard {{shard}}")],
                     unit="bytes",
                     desc="Cylinders kept for later searches ([dedup] expanded_cache_mib, split between a process's shards). "
                          "Flat below the budget while the gallery is smaller than it; at the budget, subjects first compared "
                          "after it filled are expanded at every search."), 12, 8)
    l.add(timeseries("Late enrolments compared",
                     [(f"sum(rate(cardpipe_dedup_late_enrolments_compared_total[{RATE}]))", "per second")],
                     unit="ops",
                     desc="Subjects enrolled while an unlocked search ran, compared 1:1 under the gallery lock, per second. "
                          "It grows with the search time and the enrolment rate; the lock is held for these comparisons."), 12, 8)
    l.add(timeseries("Probes per search pass",
                     [(f"sum(rate(cardpipe_dedup_search_batch_probes_sum[{RATE}])) / sum(rate(cardpipe_dedup_search_batch_probes_count[{RATE}]))", "mean"),
                      (f"histogram_quantile(0.95, sum by (le) (rate(cardpipe_dedup_search_batch_probes_bucket[{RATE}])))", "p95")],
                     unit="short",
                     desc="Concurrent dedup jobs' probes searched in one pass over the gallery (scatter = local): mean and p95. "
                          "Near 1 with work queued means too few jobs at once ([stages.dedup] concurrency)."), 12, 8)
    l.add(timeseries("Dedup stage duration",
                     [(f'histogram_quantile(0.95, sum by (le) (rate(cardpipe_job_duration_seconds_bucket{{stage="dedup"}}[{RATE}])))', "p95"),
                      (f'histogram_quantile(0.5, sum by (le) (rate(cardpipe_job_duration_seconds_bucket{{stage="dedup"}}[{RATE}])))', "p50")],
                     unit="s"), 12, 8)

    l.row("Candidates and adjudication")
    l.add(timeseries("Possible duplicates",
                     [(f"sum(rate(cardpipe_dedup_possible_duplicates_total[{RATE}])) * 3600", "per hour")],
                     desc="Searches that produced a possible duplicate, sent to operator adjudication."), 8, 8)
    l.add(timeseries("Possible-duplicate rate",
                     [(f"sum(rate(cardpipe_dedup_possible_duplicates_total[{RATE}])) / sum(rate(cardpipe_dedup_search_duration_seconds_count[{RATE}]))", "share of searches")],
                     unit="percentunit", desc="Share of searches that produced a candidate. A jump points at the matcher threshold or at bad enrolment data."), 8, 8)
    l.add(timeseries("Adjudication states",
                     [('cardpipe:applications:max{state=~"dedup_pending|possible_duplicate|confirmed_duplicate|cleared"}', "{{state}}")],
                     desc="Waiting for search, waiting for an operator, and the operators' decisions."), 8, 8)
    l.add(timeseries("Dedup queue",
                     [('cardpipe:queue_depth:max{stage="dedup"}', "{{queue}}")]), 12, 7)
    l.add(timeseries("Dedup jobs",
                     [(f'sum by (outcome) (rate(cardpipe_jobs_total{{stage="dedup"}}[{RATE}]))', "{{outcome}}")],
                     unit="ops"), 12, 7)

    l.row("Sharding (broker scatter-gather)")
    l.add(timeseries("Gallery lock wait",
                     [(f"histogram_quantile(0.95, sum by (le) (rate(cardpipe_dedup_gallery_lock_wait_seconds_bucket[{RATE}])))", "p95"),
                      (f"histogram_quantile(0.5, sum by (le) (rate(cardpipe_dedup_gallery_lock_wait_seconds_bucket[{RATE}])))", "p50")],
                     unit="s", desc="Time a dedup job waited for the gallery lock (one search + enrolment at a time across processes)."), 12, 7)
    l.add(timeseries("Shard answers",
                     [(f"sum by (service) (rate(cardpipe_dedup_shard_answers_total[{RATE}]))", "{{service}}")],
                     unit="ops", desc="Shard answers computed by the dedup-shard-<k> stages."), 12, 7)

    l.row("MOSIP ABIS API (cardpipe abis serve)")
    l.add(timeseries("ABIS requests",
                     [(f"sum by (operation, outcome) (rate(cardpipe_abis_requests_total[{RATE}]))", "{{operation}} {{outcome}}")],
                     unit="ops",
                     desc="MOSIP ABIS API requests answered (queue and HTTP), by operation and outcome: "
                          "'success' or the MOSIP failure reason code (7: data share unreachable, "
                          "17: data share expired, 10: referenceId already inserted...)."), 16, 7)
    l.add(stat("ABIS gallery", "max(cardpipe_abis_references)",
               desc="Reference ids in the MOSIP ABIS gallery (separate from the pipeline's)."), 8, 7)

    return dashboard("cardpipe-dedup", "cardpipe / Dedup",
                     "Biometric deduplication: search latency, gallery size, candidates and adjudication.", l)


# ------------------------------------------------------------------ delivery

def delivery():
    l = Layout()
    l.row("Overview")
    l.add(stat("Boxes dispatched (24 h)", "sum(increase(cardpipe_boxes_dispatched_total[24h]))", decimals=0), 4, 4)
    l.add(stat("In transit", 'sum(cardpipe:applications:max{state="shipped"})',
               desc="Cards shipped, not yet acknowledged by the office."), 4, 4)
    l.add(stat("At offices", 'sum(cardpipe:applications:max{state="at_office"})'), 4, 4)
    l.add(stat("Collected (24 h)", "sum(increase(cardpipe_cards_collected_total[24h]))", decimals=0), 4, 4)
    l.add(stat("Near voiding", "max(cardpipe_cards_near_voiding) or vector(0)",
               desc="Uncollected cards within 30 days of being voided.",
               steps=[(None, "green"), (1, "orange")]), 4, 4)
    l.add(stat("Voided (30 d)", "sum(increase(cardpipe_cards_voided_total[30d]))", decimals=0), 4, 4)

    l.row("Shipping and pickup")
    l.add(timeseries("Boxes dispatched",
                     [("sum(increase(cardpipe_boxes_dispatched_total[1h]))", "boxes / h")], bars=True), 12, 8)
    l.add(timeseries("Cards by delivery state",
                     [('cardpipe:applications:max{state=~"packed|shipped|at_office"}', "{{state}}")]), 12, 8)
    l.add(timeseries("Cards collected",
                     [("sum(increase(cardpipe_cards_collected_total[1h]))", "collected / h")], bars=True), 12, 8)
    l.add(timeseries("Collected and voided (totals)",
                     [('cardpipe:applications:max{state=~"collected|voided"}', "{{state}}")]), 12, 8)

    l.add(timeseries("Cards packed, shipped, received",
                     [(f"sum(rate(cardpipe_delivery_cards_packed_total[{RATE}])) * 3600", "packed / h"),
                      (f"sum(rate(cardpipe_delivery_cards_shipped_total[{RATE}])) * 3600", "shipped / h"),
                      (f"sum(rate(cardpipe_delivery_cards_received_total[{RATE}])) * 3600", "received at office / h")]), 12, 8)
    l.add(timeseries("Office discrepancies and transfers",
                     [("sum by (kind) (increase(cardpipe_delivery_discrepancies_total[1h]))", "{{kind}} cards / h"),
                      ("sum(increase(cardpipe_delivery_transfers_total[1h]))", "transfers / h")], bars=True,
                     desc="Cards reported missing from or extra in a received box; cards moved to another office after dispatch."), 12, 8)
    l.add(timeseries("Handovers by outcome",
                     [("sum by (outcome) (increase(cardpipe_delivery_handovers_total[1h]))", "{{outcome}}")], bars=True), 24, 7)

    l.row("SMS and reminders")
    l.add(timeseries("SMS by kind and result",
                     [(f"sum by (kind, outcome) (rate(cardpipe_sms_sent_total[{RATE}])) * 3600", "{{kind}} {{outcome}}")],
                     desc="SMS per hour (ready for pickup, reminders, ...), by delivery result."), 12, 8)
    l.add(timeseries("SMS failure ratio (15 min)",
                     [("cardpipe:sms_failed:ratio15m", "failed share")],
                     unit="percentunit", steps=[(None, "green"), (0.1, "red")],
                     desc="Share of SMS failed or permanently failed. Alert over 10 %; any permanent failure also alerts."), 6, 8)
    l.add(stat("Permanent SMS failures (24 h)",
               'sum(increase(cardpipe_sms_sent_total{outcome="permanent_failure"}[24h])) or vector(0)',
               decimals=0, steps=[(None, "green"), (1, "red")]), 6, 8)

    l.add(timeseries("SMS scheduled and held",
                     [(f"sum by (kind) (rate(cardpipe_delivery_sms_scheduled_total[{RATE}])) * 3600", "scheduled {{kind}}"),
                      (f"sum by (reason) (rate(cardpipe_delivery_sms_held_total[{RATE}])) * 3600", "held {{reason}}")],
                     desc="SMS created per hour (one per application and kind) and SMS not sent now (quiet hours, card collected or voided meanwhile, no gateway)."), 24, 7)

    l.row("SLA and voiding")
    l.add(timeseries("Overdue applications",
                     [("max(cardpipe_applications_overdue)", "older than 30 days, not at an office")],
                     steps=[(None, "green"), (1, "red")],
                     desc="The programme promises a card 15 days to one month after application."), 8, 8)
    l.add(timeseries("Cards near voiding", [("max(cardpipe_cards_near_voiding)", "within 30 days of voiding")]), 8, 8)
    l.add(timeseries("Cards voided",
                     [("sum(increase(cardpipe_cards_voided_total[1d]))", "voided / day")], bars=True,
                     desc="Cards not collected within six months of issuance."), 8, 8)
    l.add(timeseries("Shipping and delivery jobs",
                     [(f'sum by (stage, outcome) (rate(cardpipe_jobs_total{{stage=~"shipping|delivery"}}[{RATE}]))', "{{stage}} {{outcome}}")],
                     unit="ops"), 24, 7)

    return dashboard("cardpipe-delivery", "cardpipe / Delivery",
                     "Boxes, cards at offices, collection, SMS reminders, voiding, SLA.", l,
                     time_from="now-7d", refresh="1m")


def main():
    OUT.mkdir(exist_ok=True)
    for name, d in (("pipeline", pipeline()), ("encoders", encoders()),
                    ("dedup", dedup()), ("delivery", delivery())):
        path = OUT / f"cardpipe-{name}.json"
        path.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {path} ({len(d['panels'])} panels)")


if __name__ == "__main__":
    main()
