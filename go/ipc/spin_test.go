package ipc

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// spinServer runs spinserver (identity_test.go's TestMain) in a process of its own: the
// client does not spin toward a server in its own process.
func spinServer(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s.sock")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=spinserver:"+path)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, _ := bufio.NewReader(out).ReadString('\n')
	if !strings.HasPrefix(line, "READY") {
		t.Fatalf("the server process said %q", line)
	}
	return path
}

// mayUseTwoCPUs: the machine has another CPU, and this process may use two (the server
// process, started by it, may use the same ones).
func mayUseTwoCPUs() bool {
	online, _ := os.ReadFile("/sys/devices/system/cpu/online")
	var set unix.CPUSet
	return strings.TrimSpace(string(online)) != "0" && unix.SchedGetaffinity(0, &set) == nil &&
		set.Count() >= 2
}

// The spin before an answer's read (WithSpin): the first waits spin, some win against a fast
// server (given time on a loaded machine), a slow server soon costs none, and WithSpin(false)
// never spins. The answers are the same either way.
func TestClientSpinsForFastAnswersOnlyAndNotWhenTold(t *testing.T) {
	maySpin := mayUseTwoCPUs()
	path := spinServer(t)
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
				t.Fatalf("spins %d, won %d (may spin: %v, GOMAXPROCS %d)", st.Spins,
					st.SpinsWon, maySpin, runtime.GOMAXPROCS(0))
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

// Toward a server in this same process the client never spins (the runtime hands the answer
// over without a wake-up).
func TestClientDoesNotSpinTowardItsOwnProcess(t *testing.T) {
	_, path := startServer(t, echoHandler)
	c := dial(t, path)
	for i := 0; i < 50; i++ {
		p := []byte(fmt.Sprintf("%d", i))
		if got, err := c.Send(p); err != nil || !bytes.Equal(got, p) {
			t.Fatalf("answer %d: %q, %v", i, got, err)
		}
	}
	if st := c.Stats(); st.Spins != 0 {
		t.Fatalf("spun %d times toward this process's own server", st.Spins)
	}
}
