package vtpm

import "encoding/json"

// DecodeAnchorFile exposes the anchor file decoder to the fuzz target.
func DecodeAnchorFile(b []byte) error {
	key := make([]byte, 32)
	_, err := decodeAnchorFile("anchor.json", b, "0123456789abcdef", key)
	return err
}

// EncodeAnchorFileForTest returns a valid anchor file under the fuzz key.
func EncodeAnchorFileForTest() ([]byte, error) {
	f := anchorFile{Version: anchorFileVersion, KeyID: "0123456789abcdef", Index: "0x01307601", Counter: 3,
		Holdings: []Holding{{VMID: "0e2e0e2e-0000-4000-8000-00000000a001", Generation: 2}},
		Pending:  []anchorPending{{Ticket: 3, Changes: []pendingChange{{VMID: "0e2e0e2e-0000-4000-8000-00000000a001", From: 1, To: 2}}}}}
	key := make([]byte, 32)
	mac, err := f.mac(key)
	if err != nil {
		return nil, err
	}
	f.MAC = mac
	return jsonMarshalIndent(f)
}

func jsonMarshalIndent(v any) ([]byte, error) { return json.MarshalIndent(v, "", "  ") }
