package adminapi

import (
	"encoding/json"
	"net/http"
)

// WriteJSON answers with status and v as JSON.
func WriteJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// WriteError answers with status and err as an ErrorResponse.
func WriteError(w http.ResponseWriter, status int, err error) {
	WriteJSON(w, status, NewErrorResponse(err))
}
