// Qwen-VL on-device demo. The app module compiles the repository's JNI source (../native/java) and
// builds the native library from the repository's top-level CMakeLists.txt: see README.md.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}

dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}

rootProject.name = "QwenVLDemo"
include(":app")
