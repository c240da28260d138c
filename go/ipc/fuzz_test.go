package ipc

import (
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

// FuzzDecoder: any stream decodes without a panic, and the same way whole and one byte at a
// time (frames before the error, the error, frames after it). Seeds: every stream of
// frames.json and malformed.json. Run longer with: go test -fuzz FuzzDecoder ./ipc
func FuzzDecoder(f *testing.F) {
	for _, name := range []string{"frames.json", "malformed.json"} {
		raw, err := os.ReadFile(filepath.Join(vectorDir, name))
		if err != nil {
			f.Fatal(err)
		}
		var v struct {
			Frames  []struct{ Frame string }
			Streams []struct{ Stream string }
			Cases   []struct{ Stream string }
		}
		json.Unmarshal(raw, &v)
		for _, x := range v.Frames {
			b, _ := hex.DecodeString(x.Frame)
			f.Add(b, uint32(DefaultMaxPayload))
		}
		for _, x := range v.Streams {
			b, _ := hex.DecodeString(x.Stream)
			f.Add(b, uint32(DefaultMaxPayload))
		}
		for _, x := range v.Cases {
			b, _ := hex.DecodeString(x.Stream)
			f.Add(b, uint32(1024))
		}
	}
	f.Fuzz(func(t *testing.T, stream []byte, limit uint32) {
		limit %= 1 << 20 // keep allocations small
		b1, e1, _, a1 := decodeAll(stream, limit, 0)
		b2, e2, _, a2 := decodeAll(stream, limit, 1)
		if !reflect.DeepEqual(b1, b2) || !reflect.DeepEqual(a1, a2) {
			t.Fatalf("frames differ whole vs byte by byte: %v / %v", b1, b2)
		}
		if (e1 == nil) != (e2 == nil) || (e1 != nil && (e1.Code != e2.Code || e1.Fatal != e2.Fatal ||
			e1.RequestID != e2.RequestID || e1.HasID != e2.HasID)) {
			t.Fatalf("errors differ: %v / %v", e1, e2)
		}
		for _, fr := range append(b1, a1...) {
			p, _ := hex.DecodeString(fr.Payload)
			if uint32(len(p)) > max(limit, controlMinLimit) || fr.Type < TypeRequest || fr.Type > TypeError {
				t.Fatalf("a frame past the checks: %+v", fr)
			}
		}
	})
}
