// Package control is the vdrepl daemon's control API: the types that cross
// its unix socket, the HTTP handler the daemon serves there, and the Client
// that the CLI and doctor use.
package control
