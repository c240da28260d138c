package ipc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestSizesByteExact(t *testing.T) {
	_, path := startServer(t, echoHandler)
	c := dial(t, path)
	for _, n := range []int{0, 1, 65535, 65536, 1 << 20, 64 << 20} {
		p := pattern(n)
		got, err := c.Send(p)
		if err != nil {
			t.Fatalf("%d bytes: %v", n, err)
		}
		if !bytes.Equal(got, p) {
			t.Fatalf("%d bytes: the answer differs", n)
		}
	}
	if st := c.Stats(); st.ShmSent != 3 || st.ShmReceived != 3 {
		t.Fatalf("shared memory carried %+v, want 3 each way", st)
	}
}

func TestWithoutSharedMemoryEverythingInline(t *testing.T) {
	_, path := startServer(t, echoHandler)
	c := dial(t, path, WithSharedMemory(false))
	p := pattern(1 << 20)
	got, err := c.Send(p)
	if err != nil || !bytes.Equal(got, p) {
		t.Fatalf("inline 1 MiB: %v", err)
	}
	if st := c.Stats(); st.ShmSent != 0 || st.ShmReceived != 0 {
		t.Fatalf("shared memory used without being negotiated: %+v", st)
	}
}

func TestPipelinedRequestsMatchedByID(t *testing.T) {
	var active, peak atomic.Int32
	_, path := startServer(t, func(_ context.Context, req []byte) ([]byte, error) {
		n := active.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		active.Add(-1)
		return append([]byte("re:"), req...), nil
	})
	c := dial(t, path)
	var wg sync.WaitGroup
	errs := make(chan error, 1000)
	for i := 0; i < 1000; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			want := fmt.Sprintf("re:p-%d", i)
			got, err := c.Send([]byte(fmt.Sprintf("p-%d", i)))
			if err != nil || string(got) != want {
				errs <- fmt.Errorf("request %d: %q, %v", i, got, err)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if peak.Load() != 1 {
		t.Errorf("requests of one connection ran concurrently (%d at once), want arrival order", peak.Load())
	}
}

func TestHandlerAndApplicationErrors(t *testing.T) {
	_, path := startServer(t, func(_ context.Context, req []byte) ([]byte, error) {
		switch string(req) {
		case "fail":
			return nil, errors.New("it broke")
		case "app":
			return nil, &RemoteError{Code: 4242, Message: "custom"}
		case "panic":
			panic("oops")
		}
		return req, nil
	})
	c := dial(t, path)
	_, err := c.Send([]byte("fail"))
	var re *RemoteError
	if !errors.As(err, &re) || re.Code != CodeHandlerError || re.Message != "it broke" || !errors.Is(err, ErrHandler) {
		t.Fatalf("handler error: %v", err)
	}
	_, err = c.Send([]byte("app"))
	if !errors.As(err, &re) || re.Code != 4242 || re.Message != "custom" || errors.Is(err, ErrHandler) {
		t.Fatalf("application error: %v", err)
	}
	_, err = c.Send([]byte("panic"))
	if !errors.Is(err, ErrHandler) || !strings.Contains(err.Error(), "oops") {
		t.Fatalf("panicking handler: %v", err)
	}
	if got, err := c.Send([]byte("ok")); err != nil || string(got) != "ok" {
		t.Fatalf("after errors: %q %v", got, err)
	}
}

func TestContextAndTimeout(t *testing.T) {
	release := make(chan struct{})
	_, path := startServer(t, func(_ context.Context, req []byte) ([]byte, error) {
		if string(req) == "slow" {
			<-release
		}
		return req, nil
	})
	defer close(release)
	c := dial(t, path, WithTimeout(200*time.Millisecond))
	start := time.Now()
	_, err := c.Send([]byte("slow"))
	if !errors.Is(err, ErrTimeout) || time.Since(start) > 2*time.Second {
		t.Fatalf("timeout: %v after %v", err, time.Since(start))
	}
	c2 := dial(t, path)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := c2.SendContext(ctx, []byte("slow")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("context: %v", err)
	}
}

func TestEventsBothWays(t *testing.T) {
	var mu sync.Mutex
	var atServer []string
	s, path := startServer(t, func(ctx context.Context, req []byte) ([]byte, error) {
		if string(req) == "push" {
			for i := 0; i < 3; i++ {
				if err := ConnFromContext(ctx).SendEvent([]byte(fmt.Sprintf("ev-%d", i))); err != nil {
					return nil, err
				}
			}
		}
		return req, nil
	})
	s.OnEvent(func(ctx context.Context, p []byte) {
		if ConnFromContext(ctx) == nil {
			t.Error("no connection in the Event's context")
		}
		mu.Lock()
		atServer = append(atServer, string(p))
		mu.Unlock()
	})
	c := dial(t, path)
	var atClient []string
	c.OnEvent(func(p []byte) {
		mu.Lock()
		atClient = append(atClient, string(p))
		mu.Unlock()
	})
	big := pattern(1 << 20)
	for _, e := range [][]byte{[]byte("a"), []byte("b"), big} {
		if err := c.SendEvent(e); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Send([]byte("push")); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	if strings.Join(atClient, ",") != "ev-0,ev-1,ev-2" {
		t.Errorf("client got %q", atClient)
	}
	if len(atServer) != 3 || atServer[0] != "a" || atServer[1] != "b" || atServer[2] != string(big) {
		t.Errorf("server got %d Events", len(atServer))
	}
	mu.Unlock()
	if n := s.Broadcast([]byte("all")); n != 1 {
		t.Errorf("Broadcast reached %d", n)
	}
	eventually(t, "the broadcast arrives", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(atClient) == 4 && atClient[3] == "all"
	})
}

func TestZeroCopyRequestAndRelease(t *testing.T) {
	_, path := startServer(t, echoHandler)
	c := dial(t, path)
	p := pattern(4 << 20)
	for i := 0; i < 50; i++ {
		ans, err := c.Request(context.Background(), p)
		if err != nil {
			t.Fatal(err)
		}
		if !ans.Shared() || !bytes.Equal(ans.Bytes(), p) {
			t.Fatalf("round %d: shared %v, equal %v", i, ans.Shared(), bytes.Equal(ans.Bytes(), p))
		}
		ans.Release()
		ans.Release() // idempotent
	}
	// the echo goes back into the client's own segment: one segment, reused every time
	if n := memfdMaps(); n > 4 {
		t.Fatalf("%d memfd mappings after 50 released round trips", n)
	}
	c.Close()
	eventually(t, "no memfd mapping left", func() bool { return memfdMaps() == 0 })
}

func TestUnreleasedPayloadsAreBounded(t *testing.T) {
	// the server answers with a fresh 1 MiB each time (no echo), so each unreleased answer
	// holds one of its segments; the client maps at most 4.
	_, path := startServer(t, func(_ context.Context, req []byte) ([]byte, error) {
		return pattern(1 << 20), nil
	}, WithSendTimeout(300*time.Millisecond))
	c := dial(t, path, WithShmReceiveLimits(1<<30, 4))
	var held []*Payload
	for i := 0; i < 4; i++ {
		ans, err := c.Request(context.Background(), []byte("x"))
		if err != nil || !ans.Shared() {
			t.Fatalf("answer %d: %v", i, err)
		}
		held = append(held, ans)
	}
	// the fifth can go neither way within the server's send timeout...
	ans, err := c.Request(context.Background(), []byte("x"))
	if err == nil {
		if ans.Shared() {
			t.Fatal("a fifth segment was lent past the announced bound of 4")
		}
		ans.Release()
	} else if !errors.Is(err, ErrUnavailable) && !errors.Is(err, ErrTimeout) {
		t.Fatalf("fifth answer: %v", err)
	}
	// ...and once one is released, answers flow again
	held[0].Release()
	ans, err = c.Request(context.Background(), []byte("x"))
	if err != nil || !bytes.Equal(ans.Bytes(), pattern(1<<20)) {
		t.Fatalf("after a release: %v", err)
	}
	ans.Release()
	for _, h := range held[1:] {
		h.Release()
	}
}

func TestShutdownAnswersWhatWasSent(t *testing.T) {
	started := make(chan struct{}, 10)
	path := t.TempDir() + "/s.sock"
	s := NewServer(path, func(_ context.Context, req []byte) ([]byte, error) {
		started <- struct{}{}
		time.Sleep(100 * time.Millisecond)
		return req, nil
	})
	done := make(chan error, 1)
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- s.Serve() }()
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, %v", fi.Mode(), err)
	}
	c := dial(t, path)
	results := make(chan error, 3)
	for i := 0; i < 3; i++ {
		go func(i int) {
			got, err := c.Send([]byte(fmt.Sprint(i)))
			if err == nil && string(got) != fmt.Sprint(i) {
				err = fmt.Errorf("answer %q", got)
			}
			results <- err
		}(i)
	}
	<-started
	time.Sleep(20 * time.Millisecond) // all three are sent
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := <-results; err != nil {
			t.Errorf("a request sent before Shutdown: %v", err)
		}
	}
	if err := <-done; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket file left: %v", err)
	}
	if _, err := c.Send([]byte("late")); !errors.Is(err, ErrClosed) {
		t.Fatalf("after shutdown: %v", err)
	}
}

func TestListenRefusesALiveSocket(t *testing.T) {
	_, path := startServer(t, echoHandler)
	if err := NewServer(path, echoHandler).Listen(); err == nil {
		t.Fatal("a second server took over a live socket")
	}
	stillServes(t, path)
}

func TestListenRefusesANonSocketAndReplacesAStaleOne(t *testing.T) {
	dir := t.TempDir()
	file := dir + "/plain"
	os.WriteFile(file, []byte("data"), 0o600)
	if err := NewServer(file, echoHandler).Listen(); err == nil {
		t.Fatal("listened over a regular file")
	}
	if b, _ := os.ReadFile(file); string(b) != "data" {
		t.Fatal("the regular file was touched")
	}
	// a socket file nobody listens on (its server died) is replaced
	stale := dir + "/stale.sock"
	s1 := NewServer(stale, echoHandler)
	if err := s1.Listen(); err != nil {
		t.Fatal(err)
	}
	s1.ln.Close() // leaves the file, as a killed server would
	s2 := NewServer(stale, echoHandler)
	if err := s2.Listen(); err != nil {
		t.Fatalf("a stale socket file was not replaced: %v", err)
	}
	go s2.Serve()
	defer s2.Shutdown(context.Background())
	stillServes(t, stale)
	// the first server's Shutdown must not remove its successor's socket file
	s1.Shutdown(context.Background())
	if _, err := os.Stat(stale); err != nil {
		t.Fatalf("Shutdown removed another server's socket: %v", err)
	}
	stillServes(t, stale)
}

func TestEchoOfASliceGoesBackWithoutACopy(t *testing.T) {
	_, path := startServer(t, func(_ context.Context, req []byte) ([]byte, error) {
		if len(req) > 100 {
			return req[10 : len(req)-5], nil // a PEER_SEGMENT echo at offset 10
		}
		return req, nil
	})
	c := dial(t, path)
	p := pattern(2 << 20)
	ans, err := c.Request(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	if !ans.Shared() || !bytes.Equal(ans.Bytes(), p[10:len(p)-5]) {
		t.Fatalf("shared %v, equal %v", ans.Shared(), bytes.Equal(ans.Bytes(), p[10:len(p)-5]))
	}
	// the echo points into the client's own segment: nothing of the server's is mapped
	st := c.Stats()
	ans.Release()
	if st.ShmSent != 1 || st.ShmReceived != 1 {
		t.Fatalf("stats %+v", st)
	}
	c.c.shm.mu.Lock()
	mapped := len(c.c.shm.mapped)
	c.c.shm.mu.Unlock()
	if mapped != 0 {
		t.Fatalf("the client maps %d server segments for an echo", mapped)
	}
	// and the segment is reused for the next request once both sides let go
	eventually(t, "the segment is free again", func() bool {
		c.c.shm.mu.Lock()
		defer c.c.shm.mu.Unlock()
		for _, o := range c.c.shm.own {
			if !o.free() {
				return false
			}
		}
		return len(c.c.shm.own) == 1
	})
}

// An Event pushed while no request is in flight reaches the client both after an isolated
// request and after a stretch of back-to-back ones (when the idle timer has switched to its
// longer recheck): the background reader must take over in both cases. (Whether a broken
// recheck shows depends on where the last request falls against the timer, so several
// bursts give it several chances.)
func TestEventWhileIdle(t *testing.T) {
	s, path := startServer(t, echoHandler)
	c := dial(t, path)
	got := make(chan string, 8)
	c.OnEvent(func(p []byte) { got <- string(p) })
	for _, burst := range []int{1, 3000, 1, 700, 2000} {
		for i := 0; i < burst; i++ {
			if _, err := c.Send(pattern(64)); err != nil {
				t.Fatal(err)
			}
		}
		want := fmt.Sprintf("after %d", burst)
		if n := s.Broadcast([]byte(want)); n != 1 {
			t.Fatalf("Broadcast reached %d", n)
		}
		select {
		case ev := <-got:
			if ev != want {
				t.Fatalf("got Event %q, want %q", ev, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("the Event pushed after %d requests never reached the idle client", burst)
		}
	}
}

// A server that never sends a hello (sections 1-7 only) is waited for until helloWait after
// connecting, not before every large request: six 100 KB requests take about a second in
// all, where a wait per send took six.
func TestNoHelloServerIsWaitedForOncePerConnection(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nohello.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	served := make(chan struct{})
	go func() {
		defer close(served)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		dec := NewDecoder(DefaultMaxPayload)
		for {
			n, err := c.Read(dec.Space())
			if err != nil {
				return
			}
			dec.Commit(n)
			for {
				f, ok, perr := dec.Next()
				if perr != nil || !ok {
					break
				}
				if f.Type == TypeRequest { // the client's hello (an Event) goes unanswered
					if _, err := c.Write(EncodeFrame(TypeResponse, 0, f.RequestID, f.Payload)); err != nil {
						return
					}
				}
			}
		}
	}()
	cl, err := NewClient(path, WithTimeout(30*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	big := pattern(100_000)
	started := time.Now()
	for i := 0; i < 6; i++ {
		got, err := cl.Send(big)
		if err != nil || !bytes.Equal(got, big) {
			t.Fatalf("request %d: %v (%d bytes back)", i, err, len(got))
		}
	}
	elapsed := time.Since(started)
	cl.Close()
	<-served
	if elapsed > 4*time.Second {
		t.Fatalf("six large requests took %v: a hello wait per send", elapsed)
	}
}
