"""GenICam cameras (GigE Vision, USB3 Vision) through Aravis: --source gige://[CAMERA].

CAMERA is a camera's id (as --list-cameras prints it), serial number, IP or MAC address; gige:// alone opens the
first camera found. Aravis comes through PyGObject (`gi`, imported only here and only for such a source: the run
side stays lean without it). Frames are acquired on Aravis's own buffer pool; a buffer is converted (Bayer
demosaiced, 10-16-bit mono scaled by its bit depth, natively: cpp/lineflow/debayer.cpp) and handed back at once.
Nothing is lost silently: a gap in the camera's frame ids (frames the camera, the network or a full pool dropped)
yields dropped frames, a frame with lost packets an error frame (never scored as if whole). A camera lost mid-run
(control channel lost, or a free-running camera silent) reconnects like a lost stream (engine.sources.Outage).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from engine.common.errors import UserError
from engine.sources import RECONNECT_ATTEMPTS, Frame, Outage, SourceError, reconnect_wait

__all__ = ["SCHEME", "CameraSettings", "PIXEL_FORMATS", "open_camera", "list_cameras", "to_image", "parse_feature",
           "stream_options", "INSTALL_HINT"]

SCHEME = "gige://"
INSTALL_HINT = ("GenICam cameras need Aravis and PyGObject: apt-get install gir1.2-aravis-0.8 libgirepository1.0-dev "
                "libcairo2-dev pkg-config, then pip install -e \".[genicam]\"")
POOL_BUFFERS = 8  # Aravis's buffer pool: frames the camera may deliver while the capture thread converts one
POP_WAIT_S = 0.2  # the acquisition loop looks at the run's stop and the control channel this often
FREE_RUN_SILENCE_S = 3.0  # a free-running camera that delivers nothing this long (at least 5 frame periods) is lost
SOFTWARE_TRIGGER_RETRY_S = 1.0  # --trigger software: a trigger whose frame has not come is fired again
MAX_FRAME_ID_GAP = 1000  # a larger jump of the frame id is a camera restart, not dropped frames
# GenICam Pixel Format Naming Convention codes -> (name, kind, bits); the Bayer entries' kind is the red sample's
# place (row, column) in the top-left 2x2 cell
PIXEL_FORMATS = {
    0x01080001: ("Mono8", "mono", 8), 0x01100003: ("Mono10", "mono", 10), 0x01100005: ("Mono12", "mono", 12),
    0x01100025: ("Mono14", "mono", 14), 0x01100007: ("Mono16", "mono", 16),
    0x02180014: ("RGB8", "rgb", 8), 0x02180015: ("BGR8", "bgr", 8),
    0x01080009: ("BayerRG8", (0, 0), 8), 0x01080008: ("BayerGR8", (0, 1), 8),
    0x0108000A: ("BayerGB8", (1, 0), 8), 0x0108000B: ("BayerBG8", (1, 1), 8),
}
_FORMAT_NAMES = ", ".join(name for name, _, _ in PIXEL_FORMATS.values())


@dataclass(frozen=True)
class CameraSettings:
    """What the command line asks of a camera: features set in order (--camera-set NAME=VALUE), and a trigger
    (--trigger): None free-running, "software" (lineflow triggers each frame, paced by the line), or a trigger
    source the camera names (Line0, Line1, ...) for hardware triggers."""

    features: tuple[tuple[str, str], ...] = ()
    trigger: str | None = None

    def hardware_trigger(self) -> bool:
        """Frames come when the line's trigger fires: waiting for one is no hang, nor a lost camera."""
        return self.trigger is not None and self.trigger.lower() != "software"


def parse_feature(text: str) -> tuple[str, str]:
    """'ExposureTime=5000' -> ('ExposureTime', '5000'); refused in one line otherwise."""
    name, eq, value = text.partition("=")
    if not eq or not name.strip() or not value.strip():
        raise UserError(f"--camera-set {text!r}: expected NAME=VALUE, e.g. ExposureTime=5000")
    return name.strip(), value.strip()


def _aravis():
    """The Aravis module through PyGObject; a one-line UserError saying what to install when it is absent."""
    try:
        import gi
        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis, GLib
    except (ImportError, ValueError) as e:  # ValueError: gi present, the Aravis typelib not
        raise UserError(f"{INSTALL_HINT} ({e})") from None
    return Aravis, GLib


def list_cameras() -> list[dict]:
    """Every camera Aravis finds (GigE Vision on every interface, USB3 Vision): id (what gige://ID takes), vendor,
    model, serial, address, protocol."""
    aravis, _ = _aravis()
    aravis.update_device_list()
    return [{"id": aravis.get_device_id(i), "vendor": aravis.get_device_vendor(i), "model": aravis.get_device_model(i),
             "serial": aravis.get_device_serial_nbr(i), "address": aravis.get_device_address(i),
             "protocol": aravis.get_device_protocol(i)} for i in range(aravis.get_n_devices())]


def to_image(data, pixel_format: int, width: int, height: int) -> tuple[np.ndarray, bool]:
    """A buffer's bytes -> (image, bgr): uint8 (H, W) or (H, W, 3), or uint16 (H, W) on the 16-bit scale (a sample
    of b bits v becomes round(v * 65535 / (2^b - 1)), so every reader's value / 65535 is v / (2^b - 1): scaled by the
    bit depth, never by content). ValueError for an unknown format or a buffer too short."""
    from engine.native import _native  # the extension's one import, with its message when unbuilt
    if pixel_format not in PIXEL_FORMATS:
        raise ValueError(f"pixel format 0x{pixel_format:08x} is not read (lineflow reads {_FORMAT_NAMES})")
    name, kind, bits = PIXEL_FORMATS[pixel_format]
    channels, itemsize = (3 if kind in ("rgb", "bgr") else 1), (1 if bits == 8 else 2)
    need = width * height * channels * itemsize
    if width < 1 or height < 1 or len(data) < need:
        raise ValueError(f"{name} {width}x{height}: buffer of {len(data)} bytes, {need} expected")
    a = np.frombuffer(data, np.uint8 if itemsize == 1 else np.dtype("<u2"), width * height * channels)
    if kind in ("rgb", "bgr"):
        return a.reshape(height, width, 3), kind == "bgr"
    a = a.reshape(height, width)
    if kind == "mono":
        return (_native.scale_to_16(a, bits) if 8 < bits < 16 else a), False
    return _native.debayer(a, *kind), False


def _set_feature(device, name: str, value: str, aravis, glib) -> str:
    """Sets one feature, checked: it exists, is writable, the value is in range; returns the value read back.
    Aravis itself writes an out-of-range number as it comes (-5 us becomes 4.3e9), so the range is checked here."""
    node = device.get_feature(name)
    if node is None or not node.is_implemented() or not node.is_available():
        raise UserError(f"--camera-set {name}={value}: the camera has no feature {name!r}")
    if isinstance(node, aravis.GcCommand):
        raise UserError(f"--camera-set {name}={value}: {name} is a command, not a value")
    if node.get_actual_access_mode() not in (aravis.GcAccessMode.RW, aravis.GcAccessMode.WO) or node.is_locked():
        raise UserError(f"--camera-set {name}={value}: {name} is read-only now")
    integer = isinstance(node, aravis.GcInteger) and not isinstance(node, aravis.GcEnumeration)
    if integer or isinstance(node, aravis.GcFloat):
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"--camera-set {name}={value}: {name} takes a number") from None
        low, high = node.get_min(), node.get_max()
        if not low <= number <= high:
            raise UserError(f"--camera-set {name}={value}: out of the camera's range [{low:g}, {high:g}]")
        if integer and number != int(number):
            raise UserError(f"--camera-set {name}={value}: {name} takes a whole number")
        value = str(int(number)) if integer else value
    try:
        node.set_value_from_string(value)
        return node.get_value_as_string()
    except glib.Error as e:
        raise UserError(f"--camera-set {name}={value}: the camera refused it ({e.message})") from None


class _Camera:
    """An open camera with its stream and buffer pool, acquiring; `lost` is set from Aravis's control-lost signal."""

    def __init__(self, camera_id: str | None, label: str, settings: CameraSettings, resolve: bool = True):
        self.aravis, self.glib = _aravis()
        self.label, self.lost = label, threading.Event()
        self.last_frame_id: int | None = None
        self.underruns_seen, self.fired_at = 0, None  # fired_at: when the software trigger waiting for its frame fired
        # what opens it: a reconnection opens the same camera by the same name
        self.name = _resolve(camera_id, self.aravis) if resolve and not _is_ip(camera_id) else camera_id
        try:
            self.camera = self.aravis.Camera.new(self.name)
        except self.glib.Error as e:
            raise UserError(f"{label}: {'no such camera' if camera_id else 'no camera found'} ({e.message}); "
                            "python -m engine.run --list-cameras lists them") from None
        self.device = self.camera.get_device()
        if hasattr(self.device, "is_controller") and not self.device.is_controller():
            raise UserError(f"{label}: another application controls the camera (only one may)")
        lost = self.lost  # not self: the handler holds no reference to this object (Aravis's heartbeat thread calls it)
        self.on_lost = self.device.connect("control-lost", lambda _device: lost.set())
        try:
            for name, value in settings.features:
                _set_feature(self.device, name, value, self.aravis, self.glib)
            self._trigger(settings.trigger)
            self.pixel_format = self.camera.get_pixel_format()
            if self.pixel_format not in PIXEL_FORMATS:
                offered = [f for f in self.camera.dup_available_pixel_formats_as_strings()
                           if f in _FORMAT_NAMES.split(", ")]
                raise UserError(f"{label}: pixel format {self.camera.get_pixel_format_as_string()} is not read "
                                f"(lineflow reads {_FORMAT_NAMES}); the camera offers "
                                f"{', '.join(offered) or 'none of them'}: --camera-set PixelFormat=NAME")
            self.fps = self._frame_rate()
            self.stream = self.camera.create_stream(None, None)
            payload = self.camera.get_payload()
            for _ in range(POOL_BUFFERS):
                self.stream.push_buffer(self.aravis.Buffer.new_allocate(payload))
            self.camera.set_acquisition_mode(self.aravis.AcquisitionMode.CONTINUOUS)
            self.camera.start_acquisition()
        except self.glib.Error as e:
            self.close()
            raise UserError(f"{label}: the camera refused to start acquiring ({e.message})") from None
        except BaseException:
            self.close()
            raise

    def _trigger(self, trigger: str | None) -> None:
        self.software = trigger is not None and trigger.lower() == "software"
        if trigger is None:
            if self.device.get_feature("TriggerMode") is not None:
                self.camera.clear_triggers()  # free-running, whatever an earlier application left set
            return
        sources = list(self.camera.dup_available_trigger_sources() or [])
        wanted = {s.lower(): s for s in sources}.get(trigger.lower())
        if wanted is None:
            raise UserError(f"--trigger {trigger}: the camera's trigger sources are {', '.join(sources) or 'none'}")
        self.camera.set_trigger(wanted)  # FrameStart, rising edge, TriggerMode On

    def _frame_rate(self) -> float | None:
        try:
            fps = self.camera.get_frame_rate()
        except self.glib.Error:
            return None
        return fps if 0 < fps < 100_000 else None

    def pop(self, wait_s: float):
        """The next filled buffer, or None after wait_s (software trigger: fires one first)."""
        if self.software and (self.fired_at is None or time.monotonic() - self.fired_at > SOFTWARE_TRIGGER_RETRY_S):
            self.camera.software_trigger()  # again after a while: a trigger the camera missed waits no longer
            self.fired_at = time.monotonic()
        buffer = self.stream.timeout_pop_buffer(int(wait_s * 1e6))
        if buffer is not None:
            self.fired_at = None
        return buffer

    def silence_s(self, hardware_trigger: bool) -> float | None:
        """How long a camera may deliver nothing before it counts as lost (None: waiting for a hardware trigger is
        no loss; the control channel's heartbeat says when the camera is gone)."""
        return None if hardware_trigger else max(FREE_RUN_SILENCE_S, 5.0 / self.fps if self.fps else 0.0)

    def underruns(self) -> int:
        try:
            return int(self.stream.get_info_uint64_by_name("n_underruns"))
        except (AttributeError, self.glib.Error):
            return 0

    def close(self) -> None:
        """Stops acquisition and leaves control; a camera already lost is let go of in another thread (Aravis's
        finalisers wait for its timeouts, the GIL released)."""
        camera, device = getattr(self, "camera", None), getattr(self, "device", None)
        if camera is not None and not self.lost.is_set() and getattr(self, "stream", None) is not None:
            try:
                camera.stop_acquisition()
            except self.glib.Error:
                pass
        if device is not None and hasattr(self, "on_lost"):
            device.disconnect(self.on_lost)
            if not self.lost.is_set() and hasattr(device, "leave_control"):
                try:
                    device.leave_control()  # at once, not when Python frees the object: a reconnection may follow
                except self.glib.Error:
                    pass
        gone = [getattr(self, "stream", None), camera, device]  # the last references
        self.stream = self.camera = self.device = camera = device = None
        if self.lost.is_set():  # Aravis's own farewell to a camera that is gone times out (~10 s): in the background
            threading.Thread(target=gone.clear, name="lineflow-camera-gone", daemon=True).start()


def _is_ip(camera_id: str | None) -> bool:
    return camera_id is not None and re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", camera_id) is not None


def _resolve(camera_id: str | None, aravis) -> str | None:
    """The name Aravis opens the camera by: the camera found under this id, serial number or MAC address (None: the
    first camera found), by its id; a GigE Vision camera on loopback (a simulator) by its address, which makes
    Aravis stream over loopback too (by its id, it would send the camera's packets to another interface's address,
    which a camera bound to 127.0.0.1 cannot reach). Unknown: camera_id itself, for Aravis to refuse."""
    aravis.update_device_list()
    for i in range(aravis.get_n_devices()):
        if camera_id is None or camera_id in (aravis.get_device_id(i), aravis.get_device_serial_nbr(i),
                                              aravis.get_device_physical_id(i)):
            address = aravis.get_device_address(i) or ""
            if aravis.get_device_protocol(i) == "GigEVision" and address.startswith("127."):
                return address
            return aravis.get_device_id(i)
    return camera_id


def open_camera(spec: str, settings: CameraSettings | None = None,
                stop: threading.Event | None = None) -> Iterator[Frame]:
    """gige://[CAMERA] -> its frames. Opens the camera now (a wrong id, feature or trigger fails here, UserError),
    acquires in the generator."""
    settings, stop = settings or CameraSettings(), stop or threading.Event()
    camera_id = spec[len(SCHEME):].strip("/") or None
    camera = _Camera(camera_id, spec, settings)
    return _frames(camera, camera_id, spec, settings, stop)


def _frames(camera: _Camera, camera_id: str | None, label: str, settings: CameraSettings,
            stop: threading.Event) -> Iterator[Frame]:
    """Frames until the run stops; a lost camera reconnects with backoff (each attempt an error frame carrying the
    Outage, as does the first frame after it), or raises SourceError after RECONNECT_ATTEMPTS."""
    index, last, outage = 0, time.time(), None
    triggered, free_running = settings.hardware_trigger(), settings.trigger is None
    try:
        while not stop.is_set():
            silence = camera.silence_s(triggered)
            if not camera.lost.is_set() and (silence is None or time.time() - last < silence):
                try:
                    buffer = camera.pop(POP_WAIT_S)
                except camera.glib.Error:  # a software trigger the camera no longer takes
                    camera.lost.set()
                    continue
                if buffer is None:
                    continue
                # free-running: the newest frame goes on (drop-oldest at the pool: a waiting frame is never stale)
                superseded = free_running and camera.stream.get_n_buffers()[1] > 0
                for frame in _from_buffer(camera, buffer, index, label, superseded):
                    frame.outage, outage = outage, None
                    if frame.outage is not None and frame.outage.ended is None:
                        frame.outage.ended = time.time()
                    index += 1
                    yield frame
                last = time.time()
                continue
            why = "control channel lost" if camera.lost.is_set() else f"no frame for {silence:g} s"
            camera.lost.set()  # not asked to stop: a camera that is gone answers each request only by timing out
            camera.close()
            outage = Outage(label, last, camera.fps)
            for attempt in range(1, RECONNECT_ATTEMPTS + 1):
                wait = reconnect_wait(attempt)
                outage.attempts = attempt
                yield Frame(index, label, time.time(), error=f"camera lost ({why}): reconnecting in {wait:g} s "
                                                             f"(attempt {attempt} of {RECONNECT_ATTEMPTS})",
                            outage=outage)
                index += 1
                if stop.wait(wait):
                    return
                try:
                    camera = _Camera(camera.name, label, settings, resolve=False)
                except UserError:
                    continue
                last = time.time()  # a free-running camera has its silence limit to deliver the first frame
                if triggered:
                    outage.ended = last  # back on the control channel; the next frame carries the outage
                break
            else:
                raise SourceError(f"{label}: lost: the camera did not come back after {RECONNECT_ATTEMPTS} "
                                  "reconnection attempts")
    finally:
        camera.close()


def _from_buffer(camera: _Camera, buffer, index: int, label: str, superseded: bool = False) -> list[Frame]:
    """One buffer -> its frame: converted; an error frame when incomplete, even when superseded (a frame whose
    packets were lost completes only at the packet timeout, when the next one may be waiting already); a dropped frame,
    unread, when a newer one waits (superseded). After one dropped frame per frame id the camera skipped since the
    last; the buffer goes back to the pool before this returns."""
    now, aravis = time.time(), camera.aravis
    try:
        frame_id, status = buffer.get_frame_id(), buffer.get_status()
        stamp = buffer.get_timestamp() or None
        frame = Frame(index, label, now, fps=camera.fps, device_timestamp=stamp)
        if status != aravis.BufferStatus.SUCCESS:  # before superseded: lost packets are a fault to report
            frame.error = f"incomplete frame {frame_id} ({status.value_nick.replace('-', ' ')}): not scored"
        elif superseded:
            frame.error, frame.dropped = "dropped: a newer frame was waiting (the line is slower than the camera)", True
        else:
            try:
                frame.image, frame.bgr = to_image(buffer.get_data(), buffer.get_image_pixel_format(),
                                                  buffer.get_image_width(), buffer.get_image_height())
            except ValueError as e:
                frame.error = f"frame {frame_id}: {e}"
    finally:
        camera.stream.push_buffer(buffer)
    if frame_id == 0 and frame.error is not None:  # its leader lost: the id is unknown (GigE Vision never sends 0)
        return [frame]
    gap = _gap(camera.last_frame_id, frame_id)
    camera.last_frame_id = frame_id
    if not gap:
        return [frame]
    underruns = camera.underruns()
    why = "no free buffer in the pool" if underruns > camera.underruns_seen else "not received from the camera"
    camera.underruns_seen = underruns
    dropped = [Frame(index + i, label, now, error=f"dropped: {why}", dropped=True) for i in range(gap)]
    frame.index = index + gap
    return [*dropped, frame]


def _gap(last: int | None, frame_id: int) -> int:
    """Frame ids skipped between two buffers. GigE Vision 1 block ids are 16-bit and wrap from 65535 to 1 (0 is
    never used); larger ids (GigE Vision 2, USB3 Vision) do not wrap. A jump beyond MAX_FRAME_ID_GAP, or back, is a
    camera that restarted its count: no frame is counted dropped."""
    if last is None:
        return 0
    gap = frame_id - last - 1
    if gap < 0 and last <= 65535 and frame_id <= 65535:
        gap += 65535
    return gap if 0 < gap <= MAX_FRAME_ID_GAP else 0


def stream_options(settings: CameraSettings | None) -> dict:
    """engine.stream.run's policy and frame timeout for a camera. Triggered: "block" (every triggered frame is scored;
    while the line is behind, the pool fills and what the camera sends meanwhile is counted dropped); free-running:
    the live default, drop-oldest. Waiting for a hardware trigger is no hang: no frame timeout (the control channel's
    heartbeat says when such a camera is gone)."""
    settings = settings or CameraSettings()
    return {"policy": "block" if settings.trigger else None,
            "frame_timeout": None if settings.hardware_trigger() else -1.0}
