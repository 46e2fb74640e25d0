//! A real PostgreSQL server for the tests: `initdb` into a temp dir as the `postgres` user,
//! `pg_ctl start` on a Unix socket in that dir (no TCP), one per test binary, stopped when
//! the binary exits. Each test gets a database of its own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct Server {
    pub dir: PathBuf,
    bin: PathBuf,
    /// Settings beyond the Unix socket (the TLS server's TCP listener and certificate).
    extra: String,
    /// The TCP port, for a server that listens on 127.0.0.1.
    pub port: Option<u16>,
}

static SERVER: OnceLock<Server> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// The directory of the newest installed PostgreSQL's programs.
fn pg_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    found.retain(|p| p.join("pg_ctl").exists());
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found
        .pop()
        .expect("PostgreSQL is not installed (apt-get install postgresql; scripts/setup.sh does)")
}

fn as_postgres(bin: &Path, prog: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(bin.join(prog));
    c
}

extern "C" fn stop_at_exit() {
    if let Some(s) = SERVER.get() {
        s.stop();
        let _ = std::fs::remove_dir_all(&s.dir);
        let _ = std::fs::remove_dir_all(state_home());
    }
}

impl Server {
    /// The server this test binary shares.
    pub fn get() -> &'static Server {
        SERVER.get_or_init(|| {
            let s = Server::init(&format!("/tmp/agentmount-pg-{}", std::process::id()));
            // SAFETY: registers a plain function to run at exit.
            unsafe { libc::atexit(stop_at_exit) };
            s
        })
    }

    /// A server of the test's own (for restarting it without disturbing other tests);
    /// stopped and removed when dropped.
    pub fn private(name: &str) -> Private {
        Private(Server::init(&format!(
            "/tmp/agentmount-pg-{}-{name}",
            std::process::id()
        )))
    }

    fn init(dir: &str) -> Server {
        {
            let bin = pg_bin();
            let dir = PathBuf::from(dir);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let st = Command::new("chown")
                .arg("postgres")
                .arg(&dir)
                .status()
                .unwrap();
            assert!(st.success(), "chown postgres {}", dir.display());
            let o = as_postgres(&bin, "initdb")
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "-D",
                ])
                .arg(dir.join("data"))
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "initdb: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            // Trust for the socket, except one role that must give its password
            // (tests of PGPASSWORD and ~/.pgpass).
            std::fs::write(
                dir.join("data/pg_hba.conf"),
                "local all pwuser scram-sha-256\nlocal all all trust\n",
            )
            .unwrap();
            let s = Server {
                dir,
                bin,
                extra: String::new(),
                port: None,
            };
            s.start();
            let mut c = postgres::Client::connect(&s.url("postgres"), postgres::NoTls).unwrap();
            c.batch_execute(&format!("CREATE ROLE pwuser LOGIN PASSWORD '{PASSWORD}'"))
                .unwrap();
            s
        }
    }

    /// Starts the server (after `stop`, too: the restart tests).
    pub fn start(&self) {
        let o = as_postgres(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .arg("-o")
            .arg(format!(
                "-k {} -c listen_addresses='' -c max_connections=300 -c fsync=on {}",
                self.dir.display(),
                self.extra
            ))
            .args(["-w", "start"])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }

    /// Stops it (`fast`: connections are cut, as when the server goes away).
    pub fn stop(&self) {
        let _ = as_postgres(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .output();
    }

    pub fn url(&self, db: &str) -> String {
        match self.port {
            Some(p) => format!(
                "postgresql://postgres@/{db}?host={}&port={p}",
                self.dir.display()
            ),
            None => format!("postgresql://postgres@/{db}?host={}", self.dir.display()),
        }
    }

    /// A new, empty database; returns its URL.
    pub fn new_db(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::SeqCst)
        );
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls).unwrap();
        c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        self.url(&name)
    }
}

/// The password of the role `pwuser`.
pub const PASSWORD: &str = "sekrit-Pa55word";

impl Server {
    /// A new database owned by `pwuser` (who must log in with [`PASSWORD`]); returns its
    /// URL without the password.
    pub fn new_db_for_pwuser(&self) -> String {
        let name = format!(
            "p{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::SeqCst)
        );
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls).unwrap();
        c.batch_execute(&format!("CREATE DATABASE {name} OWNER pwuser"))
            .unwrap();
        format!("postgresql://pwuser@/{name}?host={}", self.dir.display())
    }
}

/// A client of database `url` for the test itself (another "host", or any SQL program).
pub fn client(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).unwrap()
}

/// Where the daemons of this test binary keep their per-host state.
pub fn state_home() -> PathBuf {
    let d = PathBuf::from(format!("/tmp/agentmount-pgstate-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub struct Private(pub Server);

impl std::ops::Deref for Private {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.0
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        self.0.stop();
        let _ = std::fs::remove_dir_all(&self.0.dir);
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A certificate authority and a server certificate it signed for `localhost` (only that
/// name), made with the openssl command line into `dir`: ca.crt, server.crt, server.key.
pub fn make_certs(dir: &Path, ca: &str) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca_key = format!("{ca}.key");
    let ca_crt = format!("{ca}.crt");
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-days",
        "2",
        "-subj",
        "/CN=agentmount test CA",
        "-keyout",
        &ca_key,
        "-out",
        &ca_crt,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &a);
    if ca != "ca" {
        return;
    }
    let mut r = vec!["req"];
    r.extend(ec);
    r.extend([
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    openssl(dir, &r);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.crt",
            "-extfile",
            "server.ext",
        ],
    );
}

impl Server {
    /// A server of the test's own that also listens on 127.0.0.1 with TLS (a certificate
    /// for `localhost` signed by `<dir>/certs/ca.crt`), accepting TCP clients only over TLS.
    pub fn private_tls(name: &str) -> Private {
        let mut s = Server::init(&format!("/tmp/agentmount-pg-{}-{name}", std::process::id()));
        s.stop();
        let certs = s.dir.join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        make_certs(&certs, "ca");
        for f in ["server.crt", "server.key"] {
            std::fs::copy(certs.join(f), s.dir.join("data").join(f)).unwrap();
        }
        let st = Command::new("chown")
            .args(["postgres"])
            .arg(s.dir.join("data/server.crt"))
            .arg(s.dir.join("data/server.key"))
            .status()
            .unwrap();
        assert!(st.success());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            s.dir.join("data/server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let mut hba = std::fs::read_to_string(s.dir.join("data/pg_hba.conf")).unwrap();
        hba.push_str("hostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n");
        std::fs::write(s.dir.join("data/pg_hba.conf"), hba).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        s.extra = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key"
        );
        s.port = Some(port);
        s.start();
        Private(s)
    }
}

/// Fills the database at `url` with the sample store, by `agentmount copy` (as a team
/// moves its directory in).
pub fn store_with_fixture(url: &str) {
    let o = Command::new(env!("CARGO_BIN_EXE_agentmount"))
        .args([
            "copy",
            "--quiet",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/store"),
            url,
        ])
        .env("XDG_STATE_HOME", state_home())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "copy: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A new database of the shared server holding the sample store; its URL.
pub fn fixture_db() -> String {
    let url = Server::get().new_db();
    store_with_fixture(&url);
    url
}
