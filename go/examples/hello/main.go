// Command hello is the original design's Go example. Go rejects a local variable that is
// declared and never used, so the design's text does not compile in any Go as it stands
// ("declared and not used: response", "... result"); this is the same program with the two
// results used (the lines marked "added"), and the socket path taken from the first
// argument when one is given (added, so it can run next to other servers).
//
// Run a server first, e.g. `go run ./cmd/hintens-peer serve /tmp/hintens.sock`, or
// `python -m hintens serve`.
package main

import (
	"fmt" // added
	"os"  // added

	"github.com/dotandev/hintens-go/ipc"
)

func main() {
	path := "/tmp/hintens.sock"
	if len(os.Args) > 1 { // added
		path = os.Args[1]
	}
	client, err := ipc.NewClient(path)
	if err != nil {
		panic(err)
	}
	defer client.Close()

	// Send small message
	response, err := client.Send([]byte("Hello from Go!"))
	if err != nil {
		panic(err)
	}

	// Send large data
	largeData := make([]byte, 1024*1024) // 1MB
	result, err := client.Send(largeData)
	if err != nil { // added
		panic(err)
	}
	fmt.Printf("%s\n%d bytes back\n", response, len(result)) // added
}
