package ipc

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// The spin before an answer's read (WithSpin): the first waits spin, some win against a fast
// server (given time on a loaded machine), a slow server soon costs none, and WithSpin(false)
// never spins. The answers are the same either way.
func TestClientSpinsForFastAnswersOnlyAndNotWhenTold(t *testing.T) {
	online, _ := os.ReadFile("/sys/devices/system/cpu/online")
	maySpin := strings.TrimSpace(string(online)) != "0"
	_, path := startServer(t, func(_ context.Context, req []byte) ([]byte, error) {
		if bytes.HasPrefix(req, []byte("slow")) {
			time.Sleep(20 * time.Millisecond)
		}
		return req, nil
	})
	c := dial(t, path)
	t0 := time.Now()
	for i := 0; ; i++ {
		p := []byte(fmt.Sprintf("fast %d", i))
		got, err := c.Send(p)
		if err != nil || !bytes.Equal(got, p) {
			t.Fatalf("answer %d: %q, %v", i, got, err)
		}
		st := c.Stats()
		if i >= 300 && (!maySpin || st.SpinsWon > 0 || time.Since(t0) > 5*time.Second) {
			if (st.Spins > 0 && st.SpinsWon > 0) != maySpin {
				t.Fatalf("spins %d, won %d (may spin: %v)", st.Spins, st.SpinsWon, maySpin)
			}
			break
		}
	}
	// A slow server (20 ms an answer): of 40 waits at most 19 spin (17 halvings of the
	// budget, then a probe on the 8th and on the 16th wait), and none is won.
	before := c.Stats()
	for i := 0; i < 40; i++ {
		p := []byte(fmt.Sprintf("slow %d", i))
		if got, err := c.Send(p); err != nil || !bytes.Equal(got, p) {
			t.Fatalf("slow answer %d: %q, %v", i, got, err)
		}
	}
	after := c.Stats()
	if maySpin {
		if n := after.Spins - before.Spins; n < 1 || n > 19 {
			t.Fatalf("%d of 40 slow waits spun", n)
		}
		if after.SpinsWon != before.SpinsWon {
			t.Fatalf("a slow wait won: %d -> %d", before.SpinsWon, after.SpinsWon)
		}
	}
	quiet := dial(t, path, WithSpin(false))
	for _, n := range []int{0, 64, 1 << 20} {
		p := pattern(n)
		if got, err := quiet.Send(p); err != nil || !bytes.Equal(got, p) {
			t.Fatalf("size %d: %v", n, err)
		}
	}
	if st := quiet.Stats(); st.Spins != 0 {
		t.Fatalf("WithSpin(false) spun %d times", st.Spins)
	}
}
