package ipc

// Peer credentials (SO_PEERCRED) across real uids: the test binary runs itself again as
// another user (uid 65534), which needs root; elsewhere these tests skip.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

const childEnv = "HINTENS_GO_TEST_CHILD"
const otherUID = 65534

func TestMain(m *testing.M) {
	switch mode, arg, _ := strings.Cut(os.Getenv(childEnv), ":"); mode {
	case "":
		os.Exit(m.Run())
	case "rawclient":
		// connect, and print the first frame the server sends: its hello, or its refusal
		nc, err := net.Dial("unix", arg)
		if err != nil {
			fmt.Println("dial:", err)
			os.Exit(0)
		}
		nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 4096)
		n, _ := nc.Read(buf)
		d := NewDecoder(DefaultMaxPayload)
		d.Feed(buf[:n])
		if f, ok, _ := d.Next(); ok && f.Type == TypeError {
			code, msg, _ := DecodeErrorPayload(f.Payload)
			fmt.Printf("error %d %s\n", code, msg)
		} else if ok {
			fmt.Printf("frame type %d\n", f.Type)
		} else {
			fmt.Println("nothing")
		}
		os.Exit(0)
	case "spinserver":
		// spin_test.go's server in a process of its own: "slow..." waits 20 ms
		s := NewServer(arg, func(_ context.Context, req []byte) ([]byte, error) {
			if strings.HasPrefix(string(req), "slow") {
				time.Sleep(20 * time.Millisecond)
			}
			return req, nil
		})
		if err := s.Listen(); err != nil {
			fmt.Println("listen:", err)
			os.Exit(1)
		}
		fmt.Println("READY")
		s.Serve()
	case "server":
		s := NewServer(arg, echoHandler, WithSocketMode(0o666), WithAllowedUIDs(0)) // root: the test
		if err := s.Listen(); err != nil {
			fmt.Println("listen:", err)
			os.Exit(1)
		}
		fmt.Println("READY")
		s.Serve()
	}
}

func asOtherUser(t *testing.T, env string) *exec.Cmd {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("needs root to run a process as another uid")
	}
	// the test binary sits in a directory only we may enter: run a copy another user can reach
	exe := filepath.Join(sharedDir(t), "ipc.test")
	data, err := os.ReadFile(os.Args[0])
	if err != nil || os.WriteFile(exe, data, 0o755) != nil {
		t.Fatalf("copying the test binary: %v", err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+env)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: otherUID, Gid: otherUID}}
	return cmd
}

func sharedDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "hintens-uid")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o777)
	return dir
}

func TestServerRefusesAnotherUID(t *testing.T) {
	path := filepath.Join(sharedDir(t), "s.sock")
	s := NewServer(path, echoHandler, WithSocketMode(0o666)) // only the uid check stands in the way
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	go s.Serve()
	defer s.Shutdown(context.Background())
	out, err := asOtherUser(t, "rawclient:"+path).CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v: %s", err, out)
	}
	if !strings.HasPrefix(string(out), fmt.Sprintf("error %d uid %d", CodeUnavailable, otherUID)) {
		t.Fatalf("a client of uid %d got: %s", otherUID, out)
	}
	// with the default mode 0600 it cannot even connect
	path2 := filepath.Join(sharedDir(t), "s2.sock")
	s2 := NewServer(path2, echoHandler)
	if err := s2.Listen(); err != nil {
		t.Fatal(err)
	}
	go s2.Serve()
	defer s2.Shutdown(context.Background())
	out, _ = asOtherUser(t, "rawclient:"+path2).CombinedOutput()
	if !strings.Contains(string(out), "permission denied") {
		t.Fatalf("connecting to a 0600 socket of another user: %s", out)
	}
	stillServes(t, path)
}

func TestServerAllowsListedUID(t *testing.T) {
	path := filepath.Join(sharedDir(t), "s.sock")
	s := NewServer(path, echoHandler, WithSocketMode(0o666), WithAllowedUIDs(otherUID))
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	go s.Serve()
	defer s.Shutdown(context.Background())
	out, err := asOtherUser(t, "rawclient:"+path).CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), fmt.Sprintf("frame type %d", TypeEvent)) {
		t.Fatalf("an allowed uid got: %s (%v)", out, err)
	}
}

func TestServerAllowsListedGID(t *testing.T) {
	path := filepath.Join(sharedDir(t), "s.sock")
	s := NewServer(path, echoHandler, WithSocketMode(0o666), WithAllowedGIDs(otherUID))
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	go s.Serve()
	defer s.Shutdown(context.Background())
	out, err := asOtherUser(t, "rawclient:"+path).CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), fmt.Sprintf("frame type %d", TypeEvent)) {
		t.Fatalf("an allowed gid got: %s (%v)", out, err)
	}
}

func TestClientRefusesServerOfAnotherUID(t *testing.T) {
	path := filepath.Join(sharedDir(t), "s.sock")
	cmd := asOtherUser(t, "server:"+path)
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	buf := make([]byte, 64)
	n, _ := stdout.Read(buf)
	if !strings.HasPrefix(string(buf[:n]), "READY") {
		t.Fatalf("server child said %q", buf[:n])
	}
	_, err := NewClient(path)
	if !errors.Is(err, ErrUntrustedServer) {
		t.Fatalf("connecting to a server of uid %d: %v", otherUID, err)
	}
	c, err := NewClient(path, WithAllowedUIDs(otherUID))
	if err != nil {
		t.Fatalf("with the uid allowed: %v", err)
	}
	defer c.Close()
	if got, err := c.Send([]byte("hi")); err != nil || string(got) != "hi" {
		t.Fatalf("echo: %q %v", got, err)
	}
}

func TestMaxConnections(t *testing.T) {
	_, path := startServer(t, echoHandler, WithMaxConnections(1))
	c := dial(t, path)
	if _, err := c.Send([]byte("x")); err != nil {
		t.Fatal(err)
	}
	p := rawDial(t, path)
	p.expectError(0, CodeUnavailable)
	p.expectEOF()
	if got, err := c.Send([]byte("y")); err != nil || string(got) != "y" {
		t.Fatalf("the first connection after a refusal: %q %v", got, err)
	}
}
