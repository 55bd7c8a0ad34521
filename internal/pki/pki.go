// Package pki makes the certificates vdrepl hosts use for mutual TLS, and
// loads them into tls.Configs, so that an admin needs no openssl.
//
// One directory holds a private CA and the certificates it issued:
//
//	ca.crt      CA certificate (PEM); every host needs it
//	ca.key      CA private key (PEM PKCS#8, mode 0600); only where certificates are issued
//	HOST.crt    host certificate, valid as TLS server and as TLS client
//	HOST.key    host private key (PEM PKCS#8, mode 0600); only on HOST
//	CLIENT.crt  client certificate (IssueOptions.Client), valid as TLS client only:
//	            an NBD client such as qemu on another host
//	CLIENT.key  its private key
//
// ExportClient copies a client's pair and the CA certificate into the
// layout NBD clients read (qemu's tls-creds-x509 and libnbd's
// tls-certificates use the same names):
//
//	ca-cert.pem      the CA certificate
//	client-cert.pem  the client certificate
//	client-key.pem   its private key (mode 0600)
//
// Keys are ECDSA P-256 unless RSA 3072 is asked for. The CA may sign only
// end-entity certificates (path length 0). A host certificate never outlives
// its CA: its validity is cut at the CA's expiry.
//
// Each file appears atomically (temporary file, fsync, rename, fsync of the
// directory), and Init and Issue never replace an existing file. The key is
// written before the certificate; if writing the pair fails, what was
// written is removed, so the command can simply be run again. Checking that
// a file is absent and renaming over its name are two steps: two runs of
// Init or Issue for the same name at the same time may race.
//
// Load checks a host's files and gives an Identity, whose ServerConfig and
// ClientConfig make TLS 1.3 connections on which both sides present and
// verify certificates from the CA. PeerName and Match then name the peer
// and check it against an allow-list; Explain turns handshake failures
// into messages that say which certificate is wrong and how to fix it.
//
// Identity is immutable and safe for concurrent use; so are the package
// functions.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// Errors about certificates, keys, names and patterns wrap one of these;
// their text says which file or certificate is at fault and what to do.
// Errors of the filesystem come wrapped as they are.
var (
	ErrExists      = errors.New("pki: file already exists")
	ErrInvalid     = errors.New("pki: invalid input")
	ErrNotFound    = errors.New("pki: not found")
	ErrKeyMismatch = errors.New("pki: private key does not match certificate")
	ErrUntrusted   = errors.New("pki: certificate not trusted") // another CA, or the wrong name
	ErrExpired     = errors.New("pki: certificate expired or not yet valid")
	ErrUsage       = errors.New("pki: certificate not valid for this use") // lacks serverAuth or clientAuth
	ErrRefused     = errors.New("pki: peer refused the TLS connection")    // see Identity.Explain
)

// Default validity periods.
const (
	DefaultCAValidity   = 10 * 365 * 24 * time.Hour
	DefaultHostValidity = 825 * 24 * time.Hour
	// WarnBefore is how long before expiry Warnings starts to warn.
	WarnBefore = 30 * 24 * time.Hour
)

// backdate is how far before "now" certificates become valid, so that a
// peer whose clock is a little behind accepts a certificate just issued.
const backdate = 5 * time.Minute

// Files are the paths of a key pair and of the CA certificate.
type Files struct {
	Cert, Key, CA string
}

// InitOptions tune Init. The zero value is fine.
type InitOptions struct {
	Name     string           // in the CA's name "vdrepl CA NAME"; default: the host name
	Validity time.Duration    // default DefaultCAValidity
	Now      func() time.Time // default time.Now
}

// IssueOptions tune Issue. The zero value is fine.
type IssueOptions struct {
	SANs     []string         // more names: host names, or IP addresses
	RSA      bool             // RSA 3072 instead of ECDSA P-256
	Validity time.Duration    // default DefaultHostValidity, cut at the CA's expiry
	Now      func() time.Time // default time.Now
	// Client makes a certificate for TLS clients only (clientAuth): what
	// an NBD client on another host presents, never a host's identity.
	Client bool
}

// Init creates a CA in dir (made, mode 0700, if missing): dir/ca.crt and
// dir/ca.key. It refuses with ErrExists if either file exists.
func Init(dir string, opt InitOptions) (Files, error) {
	return initCA(vfs.Default, dir, opt)
}

func initCA(fsys vfs.FS, dir string, opt InitOptions) (Files, error) {
	files := Files{Cert: filepath.Join(dir, "ca.crt"), Key: filepath.Join(dir, "ca.key")}
	files.CA = files.Cert
	name := opt.Name
	if name == "" {
		h, err := os.Hostname()
		if err != nil {
			return Files{}, fmt.Errorf("pki: CA name: %w", err)
		}
		name = h
	}
	cn := "vdrepl CA " + name
	if len(cn) > 64 || strings.ContainsFunc(name, func(r rune) bool { return r < ' ' || r == 0x7f }) {
		return Files{}, errorf(ErrInvalid, "CA name %q: want at most 54 printable characters", name)
	}
	if err := refuseExisting(fsys, files.Key, files.Cert); err != nil {
		return Files{}, err
	}
	if err := mkdir(fsys, dir); err != nil {
		return Files{}, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Files{}, err
	}
	now := clock(opt.Now)
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(orDefault(opt.Validity, DefaultCAValidity)),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	if err := create(fsys, files, tmpl, tmpl, key, key); err != nil {
		return Files{}, err
	}
	return files, nil
}

// Issue creates dir/NAME.crt and dir/NAME.key, signed by the CA in dir. The
// certificate serves both as TLS server and as TLS client certificate. Its
// names are name and opt.SANs: IP addresses become IP SANs, the rest DNS
// SANs. name must look like a host name: letters, digits, '-' and '_' in
// dot-separated labels, '*' only as a whole first label; "ca" is the CA's.
// Issue refuses with ErrExists if either file exists.
func Issue(dir, name string, opt IssueOptions) (Files, error) {
	return issue(vfs.Default, dir, name, opt)
}

func issue(fsys vfs.FS, dir, name string, opt IssueOptions) (Files, error) {
	if err := validName(name); err != nil {
		return Files{}, errorf(ErrInvalid, "certificate name %q: %v", name, err)
	}
	if strings.EqualFold(name, "ca") {
		return Files{}, errorf(ErrInvalid, `certificate name "ca" is the CA's own; pick the host's name`)
	}
	files := Files{
		Cert: filepath.Join(dir, name+".crt"),
		Key:  filepath.Join(dir, name+".key"),
		CA:   filepath.Join(dir, "ca.crt"),
	}
	tmpl := &x509.Certificate{
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	if opt.Client {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	// A common name is limited to 64 bytes; longer names live only in the SANs.
	if len(name) <= 64 {
		tmpl.Subject.CommonName = name
	}
	seen := map[string]bool{}
	for _, s := range append([]string{name}, opt.SANs...) {
		if seen[strings.ToLower(s)] {
			continue
		}
		seen[strings.ToLower(s)] = true
		if ip, err := netip.ParseAddr(s); err == nil {
			if ip.Zone() != "" {
				return Files{}, errorf(ErrInvalid, "SAN %q: an IP address in a certificate has no zone", s)
			}
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip.AsSlice())
			continue
		}
		if err := validName(s); err != nil {
			return Files{}, errorf(ErrInvalid, "SAN %q is neither an IP address nor a host name: %v", s, err)
		}
		tmpl.DNSNames = append(tmpl.DNSNames, s)
	}
	if err := refuseExisting(fsys, files.Key, files.Cert); err != nil {
		return Files{}, err
	}
	ca, caKey, err := loadCA(fsys, dir)
	if err != nil {
		return Files{}, err
	}
	now := clock(opt.Now)
	if now.After(ca.NotAfter) {
		return Files{}, errorf(ErrExpired, "CA certificate %s expired on %s; create a new CA with `vdrepl pki init`", files.CA, day(ca.NotAfter))
	}
	tmpl.NotBefore = now.Add(-backdate)
	tmpl.NotAfter = now.Add(orDefault(opt.Validity, DefaultHostValidity))
	if tmpl.NotAfter.After(ca.NotAfter) {
		tmpl.NotAfter = ca.NotAfter
	}
	var key crypto.Signer
	if opt.RSA {
		key, err = rsa.GenerateKey(rand.Reader, 3072)
		tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
	} else {
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	}
	if err != nil {
		return Files{}, err
	}
	if err := create(fsys, files, tmpl, ca, key, caKey); err != nil {
		return Files{}, err
	}
	return files, nil
}

// loadCA reads and checks dir/ca.crt and dir/ca.key.
func loadCA(fsys vfs.FS, dir string) (*x509.Certificate, crypto.Signer, error) {
	certFile, keyFile := filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key")
	certPEM, err := readFile(fsys, certFile, "CA certificate")
	if err != nil {
		return nil, nil, err
	}
	ca, err := parseCert(certFile, certPEM)
	if err != nil {
		return nil, nil, err
	}
	if !ca.IsCA {
		return nil, nil, errorf(ErrInvalid, "%s is not a CA certificate (subject %q)", certFile, ca.Subject)
	}
	keyPEM, err := readFile(fsys, keyFile, "CA key")
	if err != nil {
		return nil, nil, err
	}
	key, err := parseKey(keyFile, keyPEM)
	if err != nil {
		return nil, nil, err
	}
	if err := matchKey(ca, certFile, key, keyFile); err != nil {
		return nil, nil, err
	}
	return ca, key, nil
}

// create signs tmpl (with a fresh serial) by parent and writes the key and
// the certificate to files.Key and files.Cert. On error it removes what it
// wrote.
func create(fsys vfs.FS, files Files, tmpl, parent *x509.Certificate, key, parentKey crypto.Signer) error {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return err
	}
	tmpl.SerialNumber = serial.Add(serial, big.NewInt(1)) // positive, up to 127 random bits
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		return fmt.Errorf("pki: sign %s: %w", files.Cert, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	err = writeNew(fsys, files.Key, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600)
	if err == nil {
		err = writeNew(fsys, files.Cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	}
	if err != nil {
		// Either file may be in place with its directory not synced.
		fsys.Remove(files.Key)
		fsys.Remove(files.Cert)
		fsys.SyncDir(filepath.Dir(files.Key))
	}
	return err
}

// refuseExisting returns ErrExists if any of names exists.
func refuseExisting(fsys vfs.FS, names ...string) error {
	for _, name := range names {
		_, err := fsys.Stat(name)
		if err == nil {
			return errorf(ErrExists, "%s already exists; move it (and its .crt/.key partner) away first to replace it", name)
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("pki: %w", err)
		}
	}
	return nil
}

// writeNew writes name atomically. A stale temporary file from a crash is
// removed first, so the temporary file is created with perm.
func writeNew(fsys vfs.FS, name string, data []byte, perm fs.FileMode) error {
	if err := fsys.Remove(name + ".tmp"); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("pki: %w", err)
	}
	if err := vfs.WriteFileAtomic(fsys, name, data, perm); err != nil {
		fsys.Remove(name + ".tmp")
		return fmt.Errorf("pki: write %s: %w", name, err)
	}
	return nil
}

// mkdir creates dir and its missing parents, mode 0700, and makes each new
// directory durable in its parent.
func mkdir(fsys vfs.FS, dir string) error {
	var missing []string // dir and its missing ancestors, deepest first
	for d := filepath.Clean(dir); ; d = filepath.Dir(d) {
		_, err := fsys.Stat(d)
		if err == nil {
			break
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("pki: %w", err)
		}
		missing = append(missing, d)
		if filepath.Dir(d) == d {
			break
		}
	}
	if len(missing) == 0 {
		return nil
	}
	if err := fsys.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	for _, d := range slices.Backward(missing) {
		if err := fsys.SyncDir(filepath.Dir(d)); err != nil {
			// Remove them, so that a second attempt makes and syncs them again.
			for _, d := range missing {
				fsys.Remove(d)
			}
			return fmt.Errorf("pki: %w", err)
		}
	}
	return nil
}

// readFile reads name; what says what the file should hold, for the error.
func readFile(fsys vfs.FS, name, what string) ([]byte, error) {
	b, err := vfs.ReadFile(fsys, name)
	if errors.Is(err, fs.ErrNotExist) {
		hint := "issue it with `vdrepl pki issue`"
		if strings.HasPrefix(what, "CA") {
			hint = "create a CA with `vdrepl pki init` or give the directory holding it"
		}
		return nil, errorf(ErrNotFound, "%s %s does not exist; %s", what, name, hint)
	}
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	return b, nil
}

// parseCert returns the first certificate in the PEM data of file name.
func parseCert(name string, data []byte) (*x509.Certificate, error) {
	der, err := pemBlock(data, "CERTIFICATE")
	if err != nil {
		return nil, errorf(ErrInvalid, "%s: %v", name, err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, errorf(ErrInvalid, "%s: %v", name, err)
	}
	return c, nil
}

// parseKey parses a PEM private key in PKCS#8, SEC 1 (EC) or PKCS#1 (RSA) form.
func parseKey(name string, data []byte) (crypto.Signer, error) {
	der, err := pemBlock(data, "PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY")
	if err != nil {
		return nil, errorf(ErrInvalid, "%s: %v", name, err)
	}
	var key any
	if key, err = x509.ParsePKCS8PrivateKey(der); err != nil {
		if key, err = x509.ParseECPrivateKey(der); err != nil {
			key, err = x509.ParsePKCS1PrivateKey(der)
		}
	}
	signer, ok := key.(crypto.Signer)
	if err != nil || !ok {
		return nil, errorf(ErrInvalid, "%s: not a private key vdrepl can use", name)
	}
	return signer, nil
}

// pemBlock returns the bytes of the first PEM block of one of types.
func pemBlock(data []byte, types ...string) ([]byte, error) {
	var found []string
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		for _, t := range types {
			if b.Type == t {
				return b.Bytes, nil
			}
		}
		found = append(found, b.Type)
	}
	if len(found) == 0 {
		return nil, fmt.Errorf("no PEM data (want %s)", types[0])
	}
	return nil, fmt.Errorf("no %s in it, only %s", types[0], strings.Join(found, ", "))
}

// matchKey checks that key is the private key of cert.
func matchKey(cert *x509.Certificate, certFile string, key crypto.Signer, keyFile string) error {
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(cert.PublicKey) {
		return errorf(ErrKeyMismatch, "key %s does not belong to certificate %s (%s); give the key issued with it", keyFile, certFile, certName(cert))
	}
	return nil
}

// validName checks a host-name-like certificate name: dot-separated labels
// of letters, digits, '-' and '_', with '*' allowed as a whole first label.
func validName(name string) error {
	if name == "" {
		return errors.New("empty")
	}
	if len(name) > 253 {
		return errors.New("longer than 253 characters")
	}
	for i, label := range strings.Split(name, ".") {
		if label == "" {
			return errors.New("empty label (leading, trailing or double dot)")
		}
		if label == "*" {
			if i > 0 {
				return errors.New("'*' is allowed only as the first label, as in *.example.com")
			}
			continue
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return fmt.Errorf("character %q not allowed (letters, digits, '.', '-', '_' and a leading '*.')", r)
			}
		}
	}
	return nil
}

// kindError is an error with its own text that also matches a sentinel.
type kindError struct{ kind, err error }

func (e *kindError) Error() string   { return e.err.Error() }
func (e *kindError) Unwrap() []error { return []error{e.kind, e.err} }

// errorf returns an error reading "pki: " + the formatted text that matches
// kind with errors.Is, and any %w operand too.
func errorf(kind error, format string, a ...any) error {
	return &kindError{kind: kind, err: fmt.Errorf("pki: "+format, a...)}
}

func clock(now func() time.Time) time.Time {
	if now == nil {
		return time.Now()
	}
	return now()
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// day formats t as a date for messages.
func day(t time.Time) string { return t.UTC().Format("2006-01-02") }
