//! The throwaway PKI of one test control plane: a CA, the API server's serving
//! certificate, client certificates, and the service-account signing key.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::error::{IoContext, Result};

/// Paths of the PEM files written by [`Pki::generate`].
#[derive(Debug, Clone)]
pub(crate) struct Pki {
    pub(crate) ca_cert: PathBuf,
    pub(crate) serving_cert: PathBuf,
    pub(crate) serving_key: PathBuf,
    pub(crate) admin_cert: PathBuf,
    pub(crate) admin_key: PathBuf,
    pub(crate) controller_manager_cert: PathBuf,
    pub(crate) controller_manager_key: PathBuf,
    /// Signs service-account tokens (API server) and token secrets (controller manager);
    /// the API server derives the verifying public key from the same file.
    pub(crate) service_account_key: PathBuf,
    /// The public half of `service_account_key` (PKIX): the API server's verifying key file
    /// reads no PKCS#8 private keys.
    pub(crate) service_account_public_key: PathBuf,
}

/// Names under which in-cluster clients reach the API server, plus loopback.
const SERVING_NAMES: &[&str] = &[
    "127.0.0.1",
    "localhost",
    "10.0.0.1",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

/// First address of `--service-cluster-ip-range`, the `kubernetes` Service's IP.
pub(crate) const SERVICE_CIDR: &str = "10.0.0.0/24";

impl Pki {
    pub(crate) fn generate(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
        let ca = certificate_authority()?;
        let write = |name: &str, pem: String| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, pem).context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };

        let ca_cert = write("ca.crt", ca.pem())?;
        let (serving_cert, serving_key) = leaf(
            &ca,
            "kube-apiserver",
            None,
            SERVING_NAMES,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (admin_cert, admin_key) = leaf(
            &ca,
            "petl-test-admin",
            Some("system:masters"),
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let (kcm_cert, kcm_key) = leaf(
            &ca,
            "system:kube-controller-manager",
            None,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let service_account = KeyPair::generate()?;
        let service_account_key = service_account.serialize_pem();
        let service_account_public_key = service_account.public_key_pem();
        Ok(Self {
            ca_cert,
            serving_cert: write("apiserver.crt", serving_cert)?,
            serving_key: write("apiserver.key", serving_key)?,
            admin_cert: write("admin.crt", admin_cert)?,
            admin_key: write("admin.key", admin_key)?,
            controller_manager_cert: write("kube-controller-manager.crt", kcm_cert)?,
            controller_manager_key: write("kube-controller-manager.key", kcm_key)?,
            service_account_key: write("service-account.key", service_account_key)?,
            service_account_public_key: write("service-account.pub", service_account_public_key)?,
        })
    }
}

fn certificate_authority() -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "petl-test-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

/// A certificate signed by `ca`; Kubernetes maps CN to the user and O to groups.
/// Returns (certificate PEM, private key PEM).
fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    common_name: &str,
    organization: Option<&str>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> Result<(String, String)> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}
