//! Proxies' projected service-account tokens, checked with the TokenReview API.
//!
//! The token must be valid for the audience the control plane expects (default `sinew`:
//! a token meant for the API server itself is refused), and must belong to a service
//! account (`system:serviceaccount:<namespace>:<name>`); the certificate is issued for that
//! namespace and service account. An answer that names no audiences is refused: an API
//! server that ignored the requested audience would otherwise pass any of the
//! account's tokens. A token bound to a Pod names it, and the proxy must be that Pod's.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use kube::{Api, Client};
use sinew_control::identity::{ReviewFuture, TokenReviewer, TokenSubject};

/// The audience proxies' tokens are requested for by default.
pub const DEFAULT_AUDIENCE: &str = "sinew";

/// A [`TokenReviewer`] over the API server's TokenReview API.
#[derive(Clone)]
pub struct KubeTokenReviewer {
    client: Client,
    audience: String,
}

impl KubeTokenReviewer {
    /// Reviews tokens with `client`, requiring `audience`.
    pub fn new(client: Client, audience: impl Into<String>) -> KubeTokenReviewer {
        KubeTokenReviewer {
            client,
            audience: audience.into(),
        }
    }
}

/// The namespace and name of a service-account user name.
pub fn service_account(username: &str) -> Option<TokenSubject> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then(|| TokenSubject {
        namespace: ns.to_owned(),
        service_account: sa.to_owned(),
        pod: None,
    })
}

/// Who a TokenReview's answer says the token belongs to, for `audience`; or why it
/// is refused.
pub fn subject_of(status: TokenReviewStatus, audience: &str) -> Result<TokenSubject, String> {
    if status.authenticated != Some(true) {
        return Err(format!(
            "the service-account token was refused by the API server{}",
            status
                .error
                .filter(|e| !e.is_empty())
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    }
    match &status.audiences {
        Some(auds) if auds.iter().any(|a| a == audience) => {}
        Some(_) => return Err(format!("the token is not meant for audience {audience:?}")),
        None => {
            return Err(format!(
                "the API server's review names no audiences: cannot tell the token is meant for {audience:?}"
            ));
        }
    }
    let user = status.user.unwrap_or_default();
    let name = user.username.clone().unwrap_or_default();
    let mut subject =
        service_account(&name).ok_or_else(|| format!("{name:?} is not a service account"))?;
    subject.pod = user
        .extra
        .as_ref()
        .and_then(|e| e.get("authentication.kubernetes.io/pod-name"))
        .and_then(|v| v.first())
        .cloned();
    Ok(subject)
}

impl TokenReviewer for KubeTokenReviewer {
    fn review(&self, token: String) -> ReviewFuture {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let audience = self.audience.clone();
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token),
                    audiences: Some(vec![audience.clone()]),
                },
                ..TokenReview::default()
            };
            let answer = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| format!("cannot review the service-account token: {e}"))?;
            subject_of(answer.status.unwrap_or_default(), &audience)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn service_account_user_names() {
        let s =
            service_account("system:serviceaccount:shop:cart").unwrap_or_else(|| panic!("parsed"));
        assert_eq!(
            (s.namespace.as_str(), s.service_account.as_str()),
            ("shop", "cart")
        );
        assert!(service_account("admin").is_none());
        assert!(service_account("system:serviceaccount:shop").is_none());
    }

    fn status(audiences: Option<Vec<&str>>, pod: Option<&str>) -> TokenReviewStatus {
        use k8s_openapi::api::authentication::v1::UserInfo;
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: audiences.map(|a| a.into_iter().map(str::to_owned).collect()),
            user: Some(UserInfo {
                username: Some("system:serviceaccount:shop:cart".into()),
                extra: pod.map(|p| {
                    [(
                        "authentication.kubernetes.io/pod-name".to_owned(),
                        vec![p.to_owned()],
                    )]
                    .into_iter()
                    .collect()
                }),
                ..UserInfo::default()
            }),
            ..TokenReviewStatus::default()
        }
    }

    #[test]
    fn a_review_must_name_the_audience_and_may_bind_a_pod() {
        let ok = subject_of(status(Some(vec!["sinew"]), Some("cart-7d9")), "sinew").unwrap();
        assert_eq!(ok.service_account, "cart");
        assert_eq!(ok.pod.as_deref(), Some("cart-7d9"));
        let none = subject_of(status(None, None), "sinew").unwrap_err();
        assert!(none.contains("names no audiences"), "{none}");
        let other = subject_of(status(Some(vec!["api"]), None), "sinew").unwrap_err();
        assert!(other.contains("not meant for audience"), "{other}");
        let mut refused = status(Some(vec!["sinew"]), None);
        refused.authenticated = Some(false);
        refused.error = Some("invalid bearer token".into());
        let e = subject_of(refused, "sinew").unwrap_err();
        assert!(e.contains("invalid bearer token"), "{e}");
    }
}
