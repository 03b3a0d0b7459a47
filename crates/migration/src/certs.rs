//! A CA and host certificates for a quick start (`ferry certs init|issue`), made with rcgen.
//! Each host certificate names the host (DNS name or IP address) and serves both ends of a
//! migration (server and client authentication). Keys are written mode 0600.
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("{0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

fn file_err(path: &Path, why: impl std::fmt::Display) -> CertError {
    CertError::File {
        path: path.into(),
        why: why.to_string(),
    }
}

/// Writes `data` to a new file (never over an existing one) with `mode`.
fn write_new(path: &Path, data: &str, mode: u32) -> Result<(), CertError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| file_err(path, e))?;
    f.write_all(data.as_bytes()).map_err(|e| file_err(path, e))
}

/// The files of the CA in `dir`.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

/// The files of host `name`'s certificate in `dir`.
pub fn host_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// Creates a CA valid for `days` in `dir` (ca.pem, ca.key); refuses to replace one.
pub fn init_ca(dir: &Path, days: u32) -> Result<(PathBuf, PathBuf), CertError> {
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let (cert, key) = ca_paths(dir);
    if cert.exists() || key.exists() {
        return Err(file_err(
            &cert,
            "a CA exists here already; not replacing it",
        ));
    }
    let mut p = CertificateParams::default();
    // A name of its own: two CAs must not look alike to a peer choosing its trust anchor.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let id = OffsetDateTime::now_utc().unix_timestamp_nanos() ^ std::process::id() as i128;
    p.distinguished_name.push(
        DnType::CommonName,
        format!("Ferry migration CA {} {:x}", host.trim(), id as u64),
    );
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(days as i64);
    let k = KeyPair::generate()?;
    let ca = CertifiedIssuer::self_signed(p, k)?;
    write_new(&key, &ca_key_pem(&ca), 0o600)?;
    write_new(&cert, &ca.pem(), 0o644)?;
    Ok((cert, key))
}

fn ca_key_pem(ca: &CertifiedIssuer<'_, KeyPair>) -> String {
    ca.key().serialize_pem() // the issuer's signing key
}

/// Issues a certificate for host `name` signed by the CA in `dir`, valid from `from` for
/// `days` (tests use a past `from` for an expired one).
pub fn issue_at(
    dir: &Path,
    name: &str,
    from: OffsetDateTime,
    days: u32,
) -> Result<(PathBuf, PathBuf), CertError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(CertError::Invalid(format!(
            "{name:?} is not a host name or address"
        )));
    }
    let (ca_cert, ca_key) = ca_paths(dir);
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| file_err(p, e));
    let signing = KeyPair::from_pem(&read(&ca_key)?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_cert)?, signing)?;
    let san = match name.parse::<std::net::IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(name.try_into()?),
    };
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.subject_alt_names = vec![san];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = from;
    p.not_after = from + Duration::days(days as i64);
    let k = KeyPair::generate()?;
    let c = p.signed_by(&k, &issuer)?;
    let (cert, key) = host_paths(dir, name);
    if cert.exists() || key.exists() {
        return Err(file_err(
            &cert,
            "a certificate for this name exists here already",
        ));
    }
    write_new(&key, &k.serialize_pem(), 0o600)?;
    write_new(&cert, &c.pem(), 0o644)?;
    Ok((cert, key))
}

/// Issues a certificate for host `name`, valid from now for `days`.
pub fn issue(dir: &Path, name: &str, days: u32) -> Result<(PathBuf, PathBuf), CertError> {
    issue_at(
        dir,
        name,
        OffsetDateTime::now_utc() - Duration::hours(1),
        days,
    )
}
