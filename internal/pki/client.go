package pki

import (
	"crypto/x509"
	"io/fs"
	"path/filepath"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// ClientFiles are the files ExportClient lays out.
type ClientFiles struct {
	Dir, CA, Cert, Key string
}

// ExportClient copies the CA certificate and the client pair dir/NAME.crt,
// dir/NAME.key into out (made, mode 0700, if missing) under the names NBD
// clients read: ca-cert.pem, client-cert.pem and client-key.pem (mode
// 0600). It first checks the pair as a server would: the key belongs to
// the certificate, and the CA issued it for TLS client use and it is valid
// now. Files of an earlier export to out are replaced, each atomically.
func ExportClient(dir, name, out string) (ClientFiles, error) {
	return exportClient(vfs.Default, dir, name, out)
}

func exportClient(fsys vfs.FS, dir, name, out string) (ClientFiles, error) {
	if err := validName(name); err != nil {
		return ClientFiles{}, errorf(ErrInvalid, "certificate name %q: %v", name, err)
	}
	caFile := filepath.Join(dir, "ca.crt")
	certFile, keyFile := filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	caPEM, err := readFile(fsys, caFile, "CA certificate")
	if err != nil {
		return ClientFiles{}, err
	}
	ca, err := parseCert(caFile, caPEM)
	if err != nil {
		return ClientFiles{}, err
	}
	certPEM, err := readFile(fsys, certFile, "certificate")
	if err != nil {
		return ClientFiles{}, err
	}
	cert, err := parseCert(certFile, certPEM)
	if err != nil {
		return ClientFiles{}, err
	}
	keyPEM, err := readFile(fsys, keyFile, "key")
	if err != nil {
		return ClientFiles{}, err
	}
	key, err := parseKey(keyFile, keyPEM)
	if err != nil {
		return ClientFiles{}, err
	}
	if err := matchKey(cert, certFile, key, keyFile); err != nil {
		return ClientFiles{}, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	now := clock(nil)
	opts := x509.VerifyOptions{Roots: pool, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	if _, err := cert.Verify(opts); err != nil {
		return ClientFiles{}, explain(err, cert, "certificate "+certFile, ca, "CA "+caFile, now)
	}
	files := ClientFiles{
		Dir:  out,
		CA:   filepath.Join(out, "ca-cert.pem"),
		Cert: filepath.Join(out, "client-cert.pem"),
		Key:  filepath.Join(out, "client-key.pem"),
	}
	if err := mkdir(fsys, out); err != nil {
		return ClientFiles{}, err
	}
	for _, f := range []struct {
		name string
		data []byte
		perm fs.FileMode
	}{{files.Key, keyPEM, 0o600}, {files.Cert, certPEM, 0o644}, {files.CA, caPEM, 0o644}} {
		if err := writeNew(fsys, f.name, f.data, f.perm); err != nil {
			return ClientFiles{}, err
		}
	}
	return files, nil
}
