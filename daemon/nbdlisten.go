package daemon

// The NBD listeners. A unix socket is the default and keeps full access:
// it is made mode 0660, group Config.NBDGroup (else the daemon's own), so
// that its file permissions are its access control. A TCP listener speaks
// NBD over TLS only, with this host's certificate and client certificates
// from its CA checked against the NBD allow-list (nbdaccess.go), unless
// Config.NBDInsecure names it plain, which only a loopback address may be.

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vdrepl/vdrepl/control"
)

// nbdAddr is one parsed NBD listen address.
type nbdAddr struct {
	network, addr string // "unix" or "tcp"
	tls           bool   // a TCP listener without NBDInsecure
}

// parseNBDAddrs checks the NBD listen addresses against the rules above.
func parseNBDAddrs(addrs []string, insecure bool) ([]nbdAddr, error) {
	var out []nbdAddr
	anyTCP := false
	for _, a := range addrs {
		network, rest, ok := strings.Cut(a, ":")
		if !ok || (network != "unix" && network != "tcp") || rest == "" {
			return nil, fmt.Errorf("%w: NBD listen address %q: want unix:PATH or tcp:HOST:PORT", control.ErrInvalid, a)
		}
		na := nbdAddr{network: network, addr: rest}
		if network == "tcp" {
			anyTCP = true
			host, _, err := net.SplitHostPort(rest)
			if err != nil {
				return nil, fmt.Errorf("%w: NBD listen address %q: %v", control.ErrInvalid, a, err)
			}
			if insecure && !loopbackHost(host) {
				return nil, fmt.Errorf("%w: --nbd-insecure with %s: plain NBD is allowed only on a loopback address (tcp:127.0.0.1:PORT or tcp:[::1]:PORT); another host must use NBD over TLS (drop --nbd-insecure and give --tls-cert, --tls-key and --tls-ca)", control.ErrInvalid, a)
			}
			na.tls = !insecure
		}
		out = append(out, na)
	}
	if insecure && !anyTCP {
		return nil, fmt.Errorf("%w: --nbd-insecure applies to a TCP listener; give one with --nbd tcp:127.0.0.1:PORT", control.ErrInvalid)
	}
	return out, nil
}

// loopbackHost reports whether a listen host is a loopback address.
func loopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}

// lookupGroup resolves --nbd-group, a group name or number.
func lookupGroup(name string) (int, error) {
	if n, err := strconv.Atoi(name); err == nil && n >= 0 {
		return n, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, fmt.Errorf("%w: --nbd-group %q: %v", control.ErrInvalid, name, err)
	}
	return strconv.Atoi(g.Gid)
}

// listenNBD opens one NBD listener.
func (d *Daemon) listenNBD(a nbdAddr) (net.Listener, error) {
	if a.network == "tcp" {
		return net.Listen("tcp", a.addr)
	}
	return listenSocket(a.addr, d.nbdGID)
}

// listenSocket listens on a unix socket at p, mode 0660 and group gid (-1
// leaves the daemon's). The socket is made under a temporary name and
// renamed into place once its mode and group are set, so there is no
// moment when it is open to more than they allow.
func listenSocket(p string, gid int) (net.Listener, error) {
	if err := removeStaleSocket(p); err != nil {
		return nil, err
	}
	tmp := p + ".new"
	if err := os.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	l, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, err
	}
	ul := l.(*net.UnixListener)
	ul.SetUnlinkOnClose(false)
	err = os.Chmod(tmp, 0o660)
	if err == nil && gid >= 0 {
		err = os.Chown(tmp, -1, gid)
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, err
	}
	return &socketListener{UnixListener: ul, path: p}, nil
}

// socketListener removes its socket file when closed and reports its
// final path as its address.
type socketListener struct {
	*net.UnixListener
	path string
}

func (l *socketListener) Close() error {
	err := l.UnixListener.Close()
	os.Remove(l.path)
	return err
}

func (l *socketListener) Addr() net.Addr { return &net.UnixAddr{Name: l.path, Net: "unix"} }

// socketDirWarning says why members of the socket's group cannot reach it
// through its directory, or "".
func socketDirWarning(p string) string {
	dir := filepath.Dir(p)
	st, err := os.Stat(dir)
	if err != nil || st.Mode().Perm()&0o011 != 0 {
		return ""
	}
	return fmt.Sprintf("--nbd-group: the directory %s of NBD socket %s is mode %#o, so the group cannot reach the socket; put the socket in a directory it may enter (--nbd unix:/run/vdrepl/nbd.sock)", dir, p, st.Mode().Perm())
}
