"""Where results go, one module a sink, each behind the Sink protocol (base.py): `write(result)` per frame,
`close(completed)` once, returning a SinkSummary.

    jsonl.py    JsonlSink    one JSON line per frame (--out)
    maps.py     MapSink      a heat-map overlay PNG per frame (--save-maps)
    video.py    VideoSink    an MP4 of overlays (--overlay-video)
    mqtt.py     MqttSink     a QoS-1 message per frame, status and heartbeat topics (--mqtt)
    webhook.py  WebhookSink  an HTTP POST per anomalous frame (--webhook)
    opcua.py    OpcUaSink    an OPC UA server with each frame's verdict and the counts, for PLCs (--opcua)
    view.py     LiveView     a live page in the browser (--view), with a review page (--review)
    metrics.py  MetricsSink  Prometheus metrics of the run at http://HOST:PORT/metrics (--metrics)
    review.py   ReviewSink   flagged frames and a sample of passed ones kept for labelling (--review)

A file sink that cannot write raises OutputError naming its file, with what it wrote before complete; a
message sink never stalls the run (bounded queues, drops counted). Heavy imports (OpenCV, paho, uvicorn)
happen inside the sink that needs them.
"""

from engine.sinks.base import Sink, SinkSummary, camera_name
from engine.sinks.jsonl import JsonlSink
from engine.sinks.maps import MapSink
from engine.sinks.metrics import MetricsSink
from engine.sinks.mqtt import MqttSink
from engine.sinks.opcua import OpcUaSink
from engine.sinks.overlay import overlay
from engine.sinks.review import ReviewSink
from engine.sinks.video import VideoSink
from engine.sinks.view import LiveView
from engine.sinks.webhook import WebhookSink

__all__ = ["Sink", "SinkSummary", "JsonlSink", "MapSink", "VideoSink", "MqttSink", "WebhookSink", "OpcUaSink",
           "LiveView", "MetricsSink", "ReviewSink", "overlay", "camera_name"]
