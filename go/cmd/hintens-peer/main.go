// Command hintens-peer is the Go peer of hintens's cross-language tests: it implements
// tests/ports/README.md (serve, the client scenarios, bench, floor-serve, floor-bench and
// memcpy) with package ipc and its defaults.
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/dotandev/hintens-go/internal/rawhook"
	"github.com/dotandev/hintens-go/ipc"
)

func usage() {
	fmt.Fprintln(os.Stderr, `usage: hintens-peer serve SOCKET
       hintens-peer client SOCKET sizes|pipeline|errors|badcrc|events|quote|kill
       hintens-peer bench SOCKET rt64|echo64m [--count N]
       hintens-peer floor-serve SOCKET
       hintens-peer floor-bench SOCKET rt64|echo64m [--count N]
       hintens-peer memcpy`)
	os.Exit(2)
}

func main() {
	args := os.Args[1:]
	if len(args) < 1 {
		usage()
	}
	var err error
	switch {
	case args[0] == "serve" && len(args) == 2:
		err = serve(args[1])
	case args[0] == "client" && len(args) == 3:
		var out any
		out, err = runScenario(args[1], args[2])
		if err == nil {
			printJSON(out)
		}
	case (args[0] == "bench" || args[0] == "floor-bench") && len(args) >= 3:
		count := 0
		if len(args) == 5 && args[3] == "--count" {
			count, err = strconv.Atoi(args[4])
		} else if len(args) != 3 {
			usage()
		}
		if err == nil {
			var out any
			if args[0] == "bench" {
				out, err = bench(args[1], args[2], count)
			} else {
				out, err = floorBench(args[1], args[2], count)
			}
			if err == nil {
				printJSON(out)
			}
		}
	case args[0] == "floor-serve" && len(args) == 2:
		err = floorServe(args[1])
	case args[0] == "memcpy" && len(args) == 1:
		printJSON(memcpyBench())
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "hintens-peer:", err)
		os.Exit(1)
	}
}

func printJSON(v any) {
	b, _ := json.Marshal(v)
	os.Stdout.Write(append(b, '\n'))
}

func ready() {
	fmt.Printf("READY %d\n", os.Getpid())
	os.Stdout.Sync()
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte((i*31 + 7) % 251)
	}
	return b
}

// ---- Quote: bincode 1.x, fixed-width little-endian, written by hand ----

type quote struct {
	ID    uint64
	Price float64
	Venue string
	Sizes []uint32
}

func (q quote) encode() []byte {
	b := binary.LittleEndian.AppendUint64(nil, q.ID)
	b = binary.LittleEndian.AppendUint64(b, math.Float64bits(q.Price))
	b = binary.LittleEndian.AppendUint64(b, uint64(len(q.Venue)))
	b = append(b, q.Venue...)
	b = binary.LittleEndian.AppendUint64(b, uint64(len(q.Sizes)))
	for _, s := range q.Sizes {
		b = binary.LittleEndian.AppendUint32(b, s)
	}
	return b
}

func decodeQuote(b []byte) (q quote, err error) {
	bad := errors.New("malformed bincode Quote")
	if len(b) < 24 {
		return q, bad
	}
	q.ID = binary.LittleEndian.Uint64(b)
	q.Price = math.Float64frombits(binary.LittleEndian.Uint64(b[8:]))
	n := binary.LittleEndian.Uint64(b[16:])
	b = b[24:]
	if n > uint64(len(b)) {
		return q, bad
	}
	q.Venue = string(b[:n])
	b = b[n:]
	if len(b) < 8 {
		return q, bad
	}
	n = binary.LittleEndian.Uint64(b)
	b = b[8:]
	if n > uint64(len(b))/4 || uint64(len(b)) != 4*n {
		return q, bad
	}
	q.Sizes = make([]uint32, n)
	for i := range q.Sizes {
		q.Sizes[i] = binary.LittleEndian.Uint32(b[4*i:])
	}
	return q, nil
}

// ---- serve ----

func serve(path string) error {
	var events, eventBytes atomic.Uint64
	handler := func(ctx context.Context, p []byte) ([]byte, error) {
		switch {
		case bytes.HasPrefix(p, []byte("err:")):
			return nil, errors.New("boom: " + string(p[4:]))
		case bytes.HasPrefix(p, []byte("app:")):
			rest := string(p[4:])
			codeText, msg, ok := strings.Cut(rest, ":")
			code, err := strconv.ParseUint(codeText, 10, 32)
			if !ok || err != nil || code < 1000 {
				return nil, fmt.Errorf("bad app request %q", rest)
			}
			return nil, &ipc.RemoteError{Code: uint32(code), Message: msg}
		case bytes.HasPrefix(p, []byte("events:")):
			n, err := strconv.Atoi(string(p[7:]))
			if err != nil || n < 0 {
				return nil, fmt.Errorf("bad events request %q", p)
			}
			conn := ipc.ConnFromContext(ctx)
			for i := 0; i < n; i++ {
				if err := conn.SendEvent([]byte(fmt.Sprintf("ev-%d", i))); err != nil {
					return nil, err
				}
			}
			return []byte(fmt.Sprintf("sent %d", n)), nil
		case string(p) == "count":
			return []byte(fmt.Sprintf("%d %d", events.Load(), eventBytes.Load())), nil
		case bytes.HasPrefix(p, []byte("quote:")):
			q, err := decodeQuote(p[6:])
			if err != nil {
				return nil, err
			}
			rev := make([]uint32, len(q.Sizes))
			for i, s := range q.Sizes {
				rev[len(rev)-1-i] = s
			}
			return quote{q.ID + 1, q.Price * 2, q.Venue + "!", rev}.encode(), nil
		}
		return p, nil
	}
	srv := ipc.NewServer(path, handler)
	srv.OnEvent(func(_ context.Context, p []byte) {
		events.Add(1)
		eventBytes.Add(uint64(len(p)))
	})
	if err := srv.Listen(); err != nil {
		return err
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	served := make(chan error, 1)
	go func() { served <- srv.Serve() }()
	ready()
	select {
	case <-sigs:
	case err := <-served:
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), ipc.DefaultShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		return err
	}
	return nil
}

// ---- client scenarios ----

type failure struct{ msg string }

func (f failure) Error() string { return f.msg }

func check(ok bool, format string, args ...any) {
	if !ok {
		panic(failure{fmt.Sprintf(format, args...)})
	}
}

func runScenario(path, name string) (out any, err error) {
	defer func() {
		if p := recover(); p != nil {
			f, ok := p.(failure)
			if !ok {
				panic(p)
			}
			err = f
		}
	}()
	scenarios := map[string]func(string) any{
		"sizes": scenarioSizes, "pipeline": scenarioPipeline, "errors": scenarioErrors,
		"badcrc": scenarioBadCRC, "events": scenarioEvents, "quote": scenarioQuote,
		"kill": scenarioKill,
	}
	fn, ok := scenarios[name]
	if !ok {
		return nil, fmt.Errorf("unknown scenario %q", name)
	}
	return fn(path), nil
}

func connect(path string, opts ...ipc.Option) *ipc.Client {
	c, err := ipc.NewClient(path, opts...)
	check(err == nil, "connect: %v", err)
	return c
}

func scenarioSizes(path string) any {
	c := connect(path)
	defer c.Close()
	for _, n := range []int{0, 1, 65535, 65536, 1 << 20, 64 << 20} {
		p := pattern(n)
		got, err := c.Send(p)
		check(err == nil, "size %d: %v", n, err)
		check(bytes.Equal(got, p), "size %d: the answer (%d bytes) differs", n, len(got))
	}
	st := c.Stats()
	return map[string]any{"ok": true, "shm_sent": st.ShmSent, "shm_received": st.ShmReceived}
}

func scenarioPipeline(path string) any {
	c := connect(path)
	defer c.Close()
	var wg sync.WaitGroup
	errs := make(chan string, 1000)
	for i := 0; i < 1000; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			p := []byte(fmt.Sprintf("p-%d", i))
			got, err := c.Send(p)
			if err != nil || !bytes.Equal(got, p) {
				errs <- fmt.Sprintf("request %d: %q, %v", i, got, err)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		check(false, "%s", e)
	}
	return map[string]any{"ok": true, "count": 1000}
}

func expectCode(err error, code uint32, text string) {
	var re *ipc.RemoteError
	check(errors.As(err, &re), "expected a remote error %d, got %v", code, err)
	check(re.Code == code, "expected code %d, got %d (%s)", code, re.Code, re.Message)
	check(strings.Contains(re.Message, text), "message %q lacks %q", re.Message, text)
}

func scenarioErrors(path string) any {
	c := connect(path)
	defer c.Close()
	_, err := c.Send([]byte("err:x"))
	expectCode(err, ipc.CodeHandlerError, "boom: x")
	check(errors.Is(err, ipc.ErrHandler), "errors.Is(err, ErrHandler) is false")
	_, err = c.Send([]byte("app:1234:custom"))
	expectCode(err, 1234, "custom")
	var re *ipc.RemoteError
	errors.As(err, &re)
	check(re.Message == "custom", "message %q", re.Message)
	got, err := c.Send([]byte("ok"))
	check(err == nil && string(got) == "ok", "ok answered %q, %v", got, err)
	return map[string]any{"ok": true}
}

func scenarioBadCRC(path string) any {
	c := connect(path)
	defer c.Close()
	const rid = 1099511627776
	frame := ipc.EncodeFrame(ipc.TypeRequest, 0, rid, []byte("bad"))
	frame[14] ^= 0xff
	frame[15] ^= 0xff
	_, err := rawhook.WriteRawAndWait(c, rid, frame, 10*time.Second)
	expectCode(err, ipc.CodeChecksum, "")
	got, err := c.Send([]byte("ok"))
	check(err == nil && string(got) == "ok", "ok answered %q, %v", got, err)
	return map[string]any{"ok": true}
}

func scenarioEvents(path string) any {
	c := connect(path)
	defer c.Close()
	var mu sync.Mutex
	var got []string
	c.OnEvent(func(p []byte) {
		mu.Lock()
		got = append(got, string(p))
		mu.Unlock()
	})
	for i := 0; i < 5; i++ {
		check(c.SendEvent([]byte(fmt.Sprintf("c-%d", i))) == nil, "SendEvent failed")
	}
	ans, err := c.Send([]byte("count"))
	check(err == nil && string(ans) == "5 15", "count answered %q, %v", ans, err)
	ans, err = c.Send([]byte("events:3"))
	check(err == nil && string(ans) == "sent 3", "events:3 answered %q, %v", ans, err)
	mu.Lock()
	defer mu.Unlock()
	check(strings.Join(got, ",") == "ev-0,ev-1,ev-2", "Events received: %q", got)
	return map[string]any{"ok": true}
}

func scenarioQuote(path string) any {
	c := connect(path)
	defer c.Close()
	sent := quote{7, 9.5, "XNAS", []uint32{100, 200, 300}}
	want := quote{8, 19.0, "XNAS!", []uint32{300, 200, 100}}
	ans, err := c.Send(append([]byte("quote:"), sent.encode()...))
	check(err == nil, "quote: %v", err)
	q, err := decodeQuote(ans)
	check(err == nil, "decoding the answer: %v", err)
	check(q.ID == want.ID && q.Price == want.Price && q.Venue == want.Venue &&
		fmt.Sprint(q.Sizes) == fmt.Sprint(want.Sizes), "quote answered %+v", q)
	check(bytes.Equal(ans, want.encode()), "the answer's bytes differ")
	return map[string]any{"ok": true}
}

func memfdMaps() int {
	b, err := os.ReadFile("/proc/self/maps")
	check(err == nil, "reading /proc/self/maps: %v", err)
	return bytes.Count(b, []byte("/memfd:"))
}

func scenarioKill(path string) any {
	c := connect(path)
	payloads := [][]byte{pattern(64), pattern(1 << 20)}
	var failed error
	var afterMS float64
	for i := 0; ; i++ {
		start := time.Now()
		p, err := c.Request(context.Background(), payloads[i%2])
		if err != nil {
			afterMS = float64(time.Since(start).Microseconds()) / 1000
			failed = err
			break
		}
		p.Release()
		if i == 0 {
			fmt.Println("RUNNING")
			os.Stdout.Sync()
		}
	}
	c.Close()
	check(errors.Is(failed, ipc.ErrClosed), "failed with %v, not a connection-closed error", failed)
	check(afterMS < 2000, "failed after %.0f ms", afterMS)
	left := memfdMaps()
	check(left == 0, "%d memfd mappings left", left)
	return map[string]any{"ok": true, "error": failed.Error(), "after_ms": afterMS, "maps_left": left}
}

// ---- benchmarks ----

func timed(call func() error, warmup, count int) ([]float64, error) {
	for i := 0; i < warmup; i++ {
		if err := call(); err != nil {
			return nil, err
		}
	}
	times := make([]float64, 0, count)
	for i := 0; i < count; i++ {
		start := time.Now()
		if err := call(); err != nil {
			return nil, err
		}
		times = append(times, time.Since(start).Seconds())
	}
	sort.Float64s(times)
	return times, nil
}

func percentile(v []float64, f float64) float64 {
	return v[min(len(v)-1, int(float64(len(v))*f))]
}

func report(kind string, times []float64) map[string]any {
	if kind == "rt64" {
		return map[string]any{"median_us": percentile(times, 0.5) * 1e6,
			"p99_us": percentile(times, 0.99) * 1e6, "n": len(times)}
	}
	return map[string]any{"median_ms": percentile(times, 0.5) * 1e3, "n": len(times)}
}

func benchShape(kind string, count int) (size, warmup, n int, err error) {
	switch kind {
	case "rt64":
		size, warmup, n = 64, 2000, 20000
	case "echo64m":
		size, warmup, n = 64<<20, 2, 10
	default:
		return 0, 0, 0, fmt.Errorf("unknown benchmark %q", kind)
	}
	if count > 0 {
		n = count
	}
	return size, warmup, n, nil
}

func bench(path, kind string, count int) (any, error) {
	size, warmup, n, err := benchShape(kind, count)
	if err != nil {
		return nil, err
	}
	c, err := ipc.NewClient(path, ipc.WithTimeout(60*time.Second))
	if err != nil {
		return nil, err
	}
	defer c.Close()
	payload := pattern(size)
	ctx := context.Background()
	times, err := timed(func() error {
		p, err := c.Request(ctx, payload)
		if err != nil {
			return err
		}
		defer p.Release()
		if len(p.Bytes()) != size {
			return fmt.Errorf("answer of %d B", len(p.Bytes()))
		}
		return nil
	}, warmup, n)
	if err != nil {
		return nil, err
	}
	return report(kind, times), nil
}

func floorServe(path string) error {
	os.Remove(path)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return err
	}
	os.Chmod(path, 0o600)
	go func() {
		for {
			c, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			go floorEcho(c)
		}
	}()
	ready()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	<-sigs
	ln.Close()
	return nil
}

// floorEcho: read a u32 LE length and that many bytes, write both back in one write.
func floorEcho(c *net.UnixConn) {
	defer c.Close()
	buf := make([]byte, 64<<10)
	have := 0
	for {
		for have < 4 {
			n, err := c.Read(buf[have:])
			if err != nil {
				return
			}
			have += n
		}
		total := 4 + int(binary.LittleEndian.Uint32(buf))
		if total > len(buf) {
			nb := make([]byte, total)
			copy(nb, buf[:have])
			buf = nb
		}
		for have < total {
			n, err := c.Read(buf[have:total])
			if err != nil {
				return
			}
			have += n
		}
		if _, err := c.Write(buf[:total]); err != nil {
			return
		}
		have = copy(buf, buf[total:have])
	}
}

func floorBench(path, kind string, count int) (any, error) {
	size, warmup, n, err := benchShape(kind, count)
	if err != nil {
		return nil, err
	}
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	out := append(binary.LittleEndian.AppendUint32(nil, uint32(size)), pattern(size)...)
	in := make([]byte, 4+size)
	times, err := timed(func() error {
		if _, err := c.Write(out); err != nil {
			return err
		}
		if _, err := io.ReadFull(c, in); err != nil {
			return err
		}
		if binary.LittleEndian.Uint32(in) != uint32(size) {
			return errors.New("bad length echoed")
		}
		return nil
	}, warmup, n)
	if err != nil {
		return nil, err
	}
	return report(kind, times), nil
}

func memcpyBench() any {
	src := pattern(64 << 20)
	dst := make([]byte, len(src))
	for i := range dst {
		dst[i] = 1
	}
	times, _ := timed(func() error { copy(dst, src); return nil }, 1, 10)
	return map[string]any{"memcpy64m_ms": percentile(times, 0.5) * 1e3}
}
