"""The spin before a reply's blocking read (``Client(spin=True)``, ``Channel.reply_spin``):
what it takes, how its budget adapts, and that it changes nothing a caller sees. The budget
rules are in hintens/transport/_ring.h (hx_spin_begin, hx_spin_end, hx_spin_after; the spins
themselves are hx_spin_recvmsg, and hx_spin_poll over TLS); the pure-Python twin never
spins."""

from __future__ import annotations

import array
import os
import socket
import threading
import time

import pytest

import hintens
from hintens.transport import unix as _unix

from .peers import start_server, stop_server

FULL_NS = 100_000          # HX_SOCKET_SPIN_MAX_NS
HALVINGS_TO_NOTHING = 17   # 100_000 halved 17 times (integer division) is 0
FIRST_PROBE = 8            # HX_RING_PROBE_MIN
#: A reply this late never comes within a spin, even on a loaded machine.
SLOW_S = 0.02

#: A process spins only on a machine with another CPU (hx_ring_max_spinners), and not while
#: it and its peer are pinned to one same CPU: the tests' peers (this process's other threads,
#: or server processes it starts) may use the CPUs this process may use.
MAY_SPIN = (os.cpu_count() or 1) > 1 and len(os.sched_getaffinity(0)) >= 2
#: A Client of this process spins: the compiled core on such a machine.
SPINS = MAY_SPIN and hintens.implementation == "cython"
#: Over TCP the peer's process is not known (no SO_PEERCRED pid): a client spins whatever
#: the affinities, on a machine with another CPU.
TCP_SPINS = (os.cpu_count() or 1) > 1 and hintens.implementation == "cython"


def spinning_channel(core, sock, spin=True):
    channel = core.Channel(sock, core.FrameDecoder())
    channel.reply_spin = spin
    return channel


def compiled(core):
    return core.Channel.__module__.endswith("_channel")


def later(delay, function, *args):
    """``function(*args)`` on a thread after ``delay`` seconds; the thread, started."""
    def run():
        time.sleep(delay)
        function(*args)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_reply_already_there_is_taken_by_the_spin_with_its_descriptor(core, pair):
    left, right = pair
    ours = spinning_channel(core, left)
    ours.max_fds = 4
    read_end, write_end = os.pipe()
    try:
        right.sendmsg([core.encode_frame(2, b"pong", 7)],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [read_end]))])
        assert ours.receive_reply(7) == b"pong"
        assert len(ours.fds) == 1   # taken by the spin's first try, with its control message
        os.write(write_end, b"!")
        assert os.read(ours.fds[0], 1) == b"!"
    finally:
        ours.close_fds()
        os.close(read_end)
        os.close(write_end)
    if compiled(core) and MAY_SPIN:
        assert ours.spin_stats() == {"spins": 1, "spins_won": 1, "spin_budget_ns": FULL_NS}
    else:
        assert ours.spin_stats()["spins"] == 0


def test_no_spin_without_reply_spin_nor_outside_receive_reply(core, pair):
    left, right = pair
    ours = spinning_channel(core, left, spin=False)
    right.sendall(core.encode_frame(2, b"a", 1))
    assert ours.receive_reply(1) == b"a"
    ours.reply_spin = True
    right.sendall(core.encode_frame(3, b"event", 2))
    assert [f.payload for f in ours.receive()] == [b"event"]   # receive() never spins
    assert ours.spin_stats()["spins"] == 0


def test_a_reply_slower_than_the_spin_halves_the_budget(core, pair):
    left, right = pair
    ours = spinning_channel(core, left)
    writer = later(0.02, right.sendall, core.encode_frame(2, b"late", 3))
    assert ours.receive_reply(3) == b"late"
    writer.join()
    if compiled(core) and MAY_SPIN:
        assert ours.spin_stats() == {"spins": 1, "spins_won": 0, "spin_budget_ns": FULL_NS // 2}


def test_a_slow_peer_soon_costs_no_spin_and_a_fast_one_restores_the_budget(cython_core, pair):
    if not MAY_SPIN:
        pytest.skip("one CPU: nothing spins")
    left, right = pair
    ours = spinning_channel(cython_core, left)
    for rid in range(1, HALVINGS_TO_NOTHING + 1):
        writer = later(SLOW_S, right.sendall, cython_core.encode_frame(2, b"slow", rid))
        assert ours.receive_reply(rid) == b"slow"
        writer.join()
    stats = ours.spin_stats()
    assert stats == {"spins": HALVINGS_TO_NOTHING, "spins_won": 0, "spin_budget_ns": 0}
    # Spent: the next waits block at once, but for a probe (a full spin) on the 8th.
    for rid in range(100, 100 + FIRST_PROBE):
        writer = later(SLOW_S, right.sendall, cython_core.encode_frame(2, b"slow", rid))
        assert ours.receive_reply(rid) == b"slow"
        writer.join()
        probed = rid == 100 + FIRST_PROBE - 1
        assert ours.spin_stats()["spins"] == HALVINGS_TO_NOTHING + probed
    assert ours.spin_stats()["spin_budget_ns"] == 0
    # A reply that is there at once (it would have paid to spin): the budget is full again,
    # unless this thread lost its CPU for 100 us in the read (a loaded machine): a few tries.
    for rid in range(200, 220):
        right.sendall(cython_core.encode_frame(2, b"fast", rid))
        assert ours.receive_reply(rid) == b"fast"
        if ours.spin_stats()["spin_budget_ns"] == FULL_NS:
            break
    assert ours.spin_stats()["spin_budget_ns"] == FULL_NS


def test_the_socket_timeout_still_ends_a_spinning_read(core, pair):
    left, _ = pair
    _unix.set_kernel_timeouts(left, 0.05)
    ours = spinning_channel(core, left)
    started = time.monotonic()
    with pytest.raises(BlockingIOError):
        ours.receive_reply(1)
    # The spin (100 us at most) comes before the kernel's timeout, which then runs whole.
    assert 0.04 < time.monotonic() - started < 2


def test_end_of_stream_during_the_spin(core, pair):
    left, right = pair
    ours = spinning_channel(core, left)
    right.sendall(b"\x01")   # one byte of a header, then the end
    right.shutdown(socket.SHUT_WR)
    assert ours.receive_reply(1) is None and ours.pending == []
    assert ours.receive_reply(1) is None and ours.pending is None


def test_a_reply_dribbled_a_byte_at_a_time_arrives_whole(core, pair):
    left, right = pair
    ours = spinning_channel(core, left)
    frame = core.encode_frame(2, bytes(range(64)), 9)

    def dribble():
        for i in range(len(frame)):
            right.sendall(frame[i:i + 1])
            time.sleep(0.0002)

    writer = threading.Thread(target=dribble)
    writer.start()
    reply = ours.receive_reply(9)
    while reply is None:
        assert ours.pending == []
        reply = ours.receive_reply(9)
    writer.join()
    assert bytes(reply) == bytes(range(64))


def test_a_dribbled_reply_spins_for_its_first_bytes_only(cython_core, pair):
    if not MAY_SPIN:
        pytest.skip("one CPU: nothing spins")
    left, right = pair
    ours = spinning_channel(cython_core, left)
    frame = cython_core.encode_frame(2, bytes(200), 4)

    def dribble():
        for i in range(0, len(frame), 8):
            right.sendall(frame[i:i + 8])
            time.sleep(0.001)

    writer = threading.Thread(target=dribble)
    writer.start()
    reads = 1
    reply = ours.receive_reply(4)
    while reply is None:
        reads += 1
        reply = ours.receive_reply(4)
    writer.join()
    assert bytes(reply) == bytes(200) and reads > 1
    assert ours.spin_stats()["spins"] == 1   # the reads inside the frame blocked at once


def test_a_descriptor_that_comes_during_the_spin_is_kept(core, pair):
    """The frame and its descriptor come some microseconds after the wait began: whether
    a MSG_DONTWAIT try or the blocking read takes them, the descriptor is there."""
    left, right = pair
    ours = spinning_channel(core, left)
    ours.max_fds = 4
    read_end, write_end = os.pipe()
    frame = core.encode_frame(2, b"fd", 5)
    go = threading.Event()

    def send_soon():
        go.wait()
        until = time.perf_counter() + 0.00003
        while time.perf_counter() < until:
            pass
        right.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", [read_end]))])

    try:
        for _ in range(20):
            writer = threading.Thread(target=send_soon)
            writer.start()
            go.set()
            assert ours.receive_reply(5) == b"fd"
            writer.join()
            go.clear()
            assert len(ours.fds) == 1
            os.close(ours.fds.pop())
    finally:
        ours.close_fds()
        os.close(read_end)
        os.close(write_end)


def test_a_signal_during_the_spin_is_handled_before_the_sleep(cython_core, pair):
    """A signal handler's exception must not wait for the reply (or the receive timeout)
    because the signal came while the read spun rather than while it slept. (Not the twin:
    there, as in any CPython socket call, a signal just before the blocking call has
    waited for it since PEP 475; this is about the spin's 100 us window.)"""
    import signal

    left, _ = pair
    _unix.set_kernel_timeouts(left, 5)
    ours = spinning_channel(cython_core, left)

    class Alarm(Exception):
        pass

    def on_alarm(signum, frame):
        raise Alarm

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for delay in (0.00002, 0.00005, 0.0001):
            started = time.monotonic()
            with pytest.raises(Alarm):
                signal.setitimer(signal.ITIMER_REAL, delay)
                ours.receive_reply(1)
            assert time.monotonic() - started < 2.5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def requests_until_a_spin_wins(client, request, expected, at_least=300, seconds=5.0,
                               spins=SPINS):
    """``at_least`` requests, then more until a spin has won (or ``seconds`` are up: on a
    loaded machine a reply can take longer than the spin many times over); each reply
    checked. Returns the client's spin_stats()."""
    until = time.monotonic() + (seconds if spins else 0)
    i = 0
    while True:
        assert bytes(client.request(request(i))) == expected(i)
        i += 1
        if i >= at_least and (client._channel.spin_stats()["spins_won"]
                              or time.monotonic() > until):
            return client._channel.spin_stats()


def test_a_client_spins_for_a_fast_server_and_not_with_spin_false(sock_path):
    """A real server process: replies within the spin are taken by it (on a machine with
    another CPU); ``spin=False`` never spins. The replies are the same either way."""
    process = start_server(sock_path)
    try:
        with hintens.Client(sock_path, timeout=30, ring=False) as client:
            spun = requests_until_a_spin_wins(client, lambda i: b"echo:%d" % i,
                                              lambda i: b"%d" % i)
        with hintens.Client(sock_path, timeout=30, ring=False, spin=False) as client:
            for i in range(50):
                assert bytes(client.request(b"echo:%d" % i)) == b"%d" % i
            still = client._channel.spin_stats()
    finally:
        stop_server(process)
    assert still["spins"] == 0
    if SPINS:
        # At least the first waits spin (the budget starts full); on an idle machine nearly
        # every reply comes within the spin. Only that something was won is certain enough
        # to assert on a loaded machine.
        assert spun["spins"] >= 1 and spun["spins_won"] >= 1
    else:
        assert spun["spins"] == 0


def test_a_client_waiting_on_a_slow_server_soon_stops_spinning(sock_path):
    process = start_server(sock_path)
    try:
        with hintens.Client(sock_path, timeout=30, ring=False) as client:
            assert bytes(client.request(b"echo:first")) == b"first"   # the hello read too
            before = client._channel.spin_stats()
            for i in range(40):
                assert bytes(client.request(b"sleep:%g:%d" % (SLOW_S, i))) == b"%d" % i
            after = client._channel.spin_stats()
    finally:
        stop_server(process)
    if SPINS:
        assert after["spin_budget_ns"] == 0
        # At most 17 halvings (fewer if the first reply was slow too), then a probe on the
        # 8th and on the 16th wait after them: 19 of the 40 waits spun at most.
        assert 1 <= after["spins"] - before["spins"] <= HALVINGS_TO_NOTHING + 2
        assert after["spins_won"] == before["spins_won"]


def test_a_tls_client_spins_too(tmp_path):
    """Over TLS (the compiled core drives OpenSSL itself) the wait polls the socket while it
    spins, and OpenSSL reads what came."""
    import ssl

    trustme = pytest.importorskip("trustme", reason="trustme is in the test extra")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    big = bytes(range(256)) * 4096   # 1 MiB inline: a frame that arrives in many records

    def handler(payload):
        if bytes(payload[:4]) == b"slow":
            time.sleep(SLOW_S)
        return payload

    with hintens.Server("tcp://127.0.0.1:0", handler, ssl_context=server_context) as server:
        address = server.addresses[0]
        with hintens.Client(address, timeout=30, ssl_context=client_context) as client:
            spun = requests_until_a_spin_wins(client, lambda i: b"tls %d" % i,
                                              lambda i: b"tls %d" % i, at_least=100,
                                              spins=TCP_SPINS)
            assert bytes(client.request(big)) == big
            for i in range(HALVINGS_TO_NOTHING + 1):   # a slow server: the budget runs out
                assert bytes(client.request(b"slow %d" % i)) == b"slow %d" % i
            drained = client._channel.spin_stats()
        with hintens.Client(address, timeout=30, ssl_context=client_context,
                            spin=False) as client:
            for i in range(20):
                assert bytes(client.request(b"%d" % i)) == b"%d" % i
            still = client._channel.spin_stats()
    assert still["spins"] == 0
    if TCP_SPINS:
        assert spun["spins"] >= 1 and spun["spins_won"] >= 1
        assert drained["spin_budget_ns"] == 0
    else:
        assert spun["spins"] == 0


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs to pin to")
def test_no_spin_while_client_and_server_are_pinned_to_one_same_cpu(sock_path):
    """Pinned together, each try would only hand the CPU to the server: the client blocks at
    once. Pinned apart, it spins. (The check reads SO_PEERCRED's pid and both affinities
    once, on the first wait.)"""
    process = start_server(sock_path)
    ours = os.sched_getaffinity(0)
    try:
        counts = {}
        for server_cpu in (0, 1):
            os.sched_setaffinity(process.pid, {server_cpu})
            os.sched_setaffinity(0, {0})
            try:
                with hintens.Client(sock_path, timeout=30, ring=False) as client:
                    for i in range(50):
                        assert bytes(client.request(b"echo:%d" % i)) == b"%d" % i
                    counts[server_cpu] = client._channel.spin_stats()["spins"]
            finally:
                os.sched_setaffinity(0, ours)
    finally:
        stop_server(process)
    assert counts[0] == 0
    assert (counts[1] >= 1) == (hintens.implementation == "cython")


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_a_hostile_server_dribbling_replies_costs_one_spin_a_reply_and_leaks_nothing(tmp_path):
    """A raw-socket server that answers each Request a byte every 200 us (the worst timing
    for a spin: something always seems about to come): each reply still costs the client at
    most one spin, the replies are right, and after the client closes, its descriptors are
    back where they were."""
    from hintens.wire import FrameDecoder, encode_frame

    path = str(tmp_path / "dribble.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        decoder = FrameDecoder()
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                for frame in decoder.feed(data):
                    if frame.type != 1:
                        continue   # the client's hello
                    reply = encode_frame(2, bytes(frame.payload), frame.request_id)
                    for i in range(len(reply)):
                        conn.sendall(reply[i:i + 1])
                        time.sleep(0.0002)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    baseline = _open_fds()
    try:
        with hintens.Client(path, timeout=30, ring=False) as client:
            for i in range(5):
                payload = b"dribbled %d" % i
                before = client._channel.spin_stats()["spins"]
                assert bytes(client.request(payload)) == payload
                assert client._channel.spin_stats()["spins"] - before <= 1
    finally:
        listener.close()
        server.join(10)
    assert _open_fds() <= baseline
