//! Unix socket listeners and what a connection's peer is: binding a socket file with
//! its permissions, replacing a stale one, removing it on shutdown, reading the peer's
//! uid; and the `Accept` seam that lets one accept loop serve TCP and Unix alike.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::config::UnixSocketConfig;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    Tcp(SocketAddr),
    /// The peer process's uid (SO_PEERCRED); `None` when the kernel did not say.
    Unix {
        uid: Option<u32>,
    },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => addr.fmt(f),
            Self::Unix { uid: Some(uid) } => write!(f, "uid {uid}"),
            Self::Unix { uid: None } => f.write_str("unknown uid"),
        }
    }
}

/// A listener the accept loop can serve.
pub trait Accept: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// The next connection and its peer.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Peer)>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;

    async fn accept(&self) -> io::Result<(TcpStream, Peer)> {
        let (stream, addr) = TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, Peer::Tcp(addr)))
    }
}

/// Why a Unix socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum UnixBindError {
    #[error(
        "cannot listen on unix:{}: another process is serving on it (stop it, or choose another path)",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error(
        "cannot listen on unix:{}: the file exists and is not a socket (remove it, or choose another path)",
        path.display()
    )]
    NotASocket { path: PathBuf },
    #[error("cannot listen on unix:{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A bound Unix socket: the listening socket and the file it owns.
pub struct UnixSocket {
    listener: std::os::unix::net::UnixListener,
    file: SocketFile,
}

impl UnixSocket {
    /// Binds `path` with the mode and group of `settings`.
    ///
    /// A socket file nobody answers on (left by a process that died) is replaced; one a
    /// live process answers on is an error, as is a path holding anything but a socket.
    /// The socket only starts listening after its mode and group are set, so no
    /// connection is accepted under the process umask's permissions. Blocking: call
    /// it off the async runtime.
    pub fn bind(path: &Path, settings: &UnixSocketConfig) -> Result<Self, UnixBindError> {
        use socket2::{Domain, SockAddr, Socket, Type};
        let io_err = |source| UnixBindError::Io {
            path: path.to_owned(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(UnixBindError::NotASocket {
                    path: path.to_owned(),
                })
            }
            Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(UnixBindError::InUse {
                        path: path.to_owned(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "replacing a stale socket file");
                    std::fs::remove_file(path).map_err(io_err)?;
                }
                Err(e) => return Err(io_err(e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(io_err)?;
        socket
            .bind(&SockAddr::unix(path).map_err(io_err)?)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AddrInUse {
                    // Another instance bound it between our check and our bind.
                    UnixBindError::InUse {
                        path: path.to_owned(),
                    }
                } else {
                    io_err(e)
                }
            })?;
        let meta = std::fs::metadata(path).map_err(io_err)?;
        // From here on the file is ours: removed again if anything below fails.
        let file = SocketFile {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(settings.mode))
            .map_err(io_err)?;
        if let Some(gid) = settings.group {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(io_err)?;
        }
        socket.listen(1024).map_err(io_err)?;
        socket.set_nonblocking(true).map_err(io_err)?;
        Ok(Self {
            listener: socket.into(),
            file,
        })
    }

    /// The socket file's path.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Registers the socket with the current runtime.
    pub fn into_listener(self) -> io::Result<UnixAccept> {
        Ok(UnixAccept {
            listener: UnixListener::from_std(self.listener)?,
            _file: self.file,
        })
    }
}

/// A Unix socket being served; dropping it removes the socket file.
pub struct UnixAccept {
    listener: UnixListener,
    _file: SocketFile,
}

impl Accept for UnixAccept {
    type Stream = UnixStream;

    async fn accept(&self) -> io::Result<(UnixStream, Peer)> {
        let (stream, _) = self.listener.accept().await?;
        let uid = stream.peer_cred().ok().map(|cred| cred.uid());
        Ok((stream, Peer::Unix { uid }))
    }
}

/// The socket file this process bound, removed when dropped unless another process
/// has replaced it meanwhile (same path, different inode).
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| meta.dev() == self.dev && meta.ino() == self.ino);
        if ours {
            if let Err(error) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), %error, "cannot remove the socket file");
            }
        }
    }
}
